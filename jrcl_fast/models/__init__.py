from jrcl_fast.models.jrcl_net import ARCHITECTURE_REVISION, JRCLNet, JRCLOutput, build_backbone, check_architecture

__all__ = ["ARCHITECTURE_REVISION", "JRCLNet", "JRCLOutput", "build_backbone", "check_architecture"]
