from jrcl_fast.models.jrcl_net import JRCLNet, JRCLOutput, build_backbone

__all__ = ["JRCLNet", "JRCLOutput", "build_backbone"]
