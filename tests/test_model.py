import pytest
import torch

from jrcl_fast.config import ModelConfig
from jrcl_fast.models import JRCLNet


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "resnet152", "resnext50_32x4d"])
def test_heads_and_shapes(backbone):
    cfg = ModelConfig(backbone=backbone, small_input_stem=True, projection_dim=24, projection_hidden_dim=32)
    model = JRCLNet(cfg, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 32, 32))
    assert out.logits.shape == (3, 7) and out.binary_logits.shape == (3, 2) and out.features.shape == (3, 24)
    torch.testing.assert_close(out.features.norm(dim=1), torch.ones(3))
    assert model.normalized_prototypes().shape == (7, 24)
    torch.testing.assert_close(model.normalized_prototypes().norm(dim=1), torch.ones(7))


def test_small_input_stem_keeps_spatial_resolution():
    small = JRCLNet(ModelConfig(backbone="resnet18", small_input_stem=True), 10).backbone
    standard = JRCLNet(ModelConfig(backbone="resnet18", small_input_stem=False), 10).backbone
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        small_map = torch.nn.Sequential(small.conv1, small.bn1, small.relu, small.maxpool)(x)
        standard_map = torch.nn.Sequential(standard.conv1, standard.bn1, standard.relu, standard.maxpool)(x)
    assert small_map.shape[-1] == 32 and standard_map.shape[-1] == 8


def test_weights_of_an_older_network_revision_are_refused_where_the_network_changed():
    from jrcl_fast.errors import UserError
    from jrcl_fast.models import ARCHITECTURE_REVISION, check_architecture

    check_architecture(None, ModelConfig(norm="batch"), "ckpt")  # batch norm: unchanged since revision 1
    check_architecture(ARCHITECTURE_REVISION, ModelConfig(norm="group"), "ckpt")
    with pytest.raises(UserError, match="^ckpt was trained with network revision 1, and since then model.norm=group"):
        check_architecture(None, ModelConfig(norm="group"), "ckpt")
    with pytest.raises(UserError, match="newer jrcl-fast"):
        check_architecture(ARCHITECTURE_REVISION + 1, ModelConfig(), "ckpt")


def test_cosine_classifier_matches_brute_force_and_is_bounded_by_its_scale():
    cfg = ModelConfig(backbone="resnet18", small_input_stem=True, classifier="cosine", cosine_scale=7.5)
    model = JRCLNet(cfg, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 3, 16, 16)).logits.abs().max() <= 7.5 + 1e-5
    h = torch.randn(4, 512, dtype=torch.float64)
    w = model.classifier.weight.detach().double()
    want = torch.tensor([[7.5 * float(a @ b / (a.norm() * b.norm())) for b in w] for a in h], dtype=torch.float64)
    torch.testing.assert_close(model.classifier.double()(h), want)


@pytest.mark.parametrize("classifier", ["linear", "cosine"])
def test_logits_are_a_view_of_16_byte_aligned_rows(classifier):
    """bf16 logits of an odd class count come as a view of rows padded to a multiple of
    8 classes (16 bytes), which the fused CE+BDC kernel reads in 128-bit vectors; the
    parameters keep their shapes, so checkpoints still load."""
    cfg = ModelConfig(backbone="resnet18", small_input_stem=True, classifier=classifier)
    model = JRCLNet(cfg, num_classes=13).to(torch.bfloat16).eval()
    assert model.classifier.weight.shape == (13, 512)
    with torch.no_grad():
        logits = model(torch.randn(3, 3, 16, 16, dtype=torch.bfloat16)).logits
    assert logits.shape == (3, 13) and logits.dtype == torch.bfloat16
    assert logits.stride() == (16, 1) and logits.data_ptr() % 16 == 0


@pytest.mark.parametrize("classifier", ["linear", "cosine"])
def test_padded_logits_have_the_values_and_gradients_of_the_plain_product(classifier):
    """Float64, C = 13: the padded classifier against its formula without padding."""
    import torch.nn.functional as F

    cfg = ModelConfig(backbone="resnet18", small_input_stem=True, classifier=classifier, cosine_scale=7.5)
    head = JRCLNet(cfg, num_classes=13).classifier.double()
    h = torch.randn(5, 512, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, 13, dtype=torch.float64)

    def plain(h):
        if classifier == "linear":
            return F.linear(h, head.weight, head.bias)
        return 7.5 * F.normalize(h, dim=1) @ F.normalize(head.weight, dim=1).T

    results = []
    for forward in (head, plain):
        logits = forward(h)
        loss = (upstream * logits).sum() + logits.logsumexp(1).sum()
        results.append((logits, *torch.autograd.grad(loss, (h, *head.parameters()))))
    assert results[0][0].stride(0) == 16
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_prototypes_derived_from_the_classifier_train_the_classifier(norm):
    cfg = ModelConfig(backbone="resnet18", small_input_stem=True, projection_dim=12, projection_hidden_dim=16,
                      norm=norm, prototypes="classifier")
    model = JRCLNet(cfg, num_classes=6)
    assert not hasattr(model, "prototypes")  # no free parameters of their own
    protos = model.normalized_prototypes()
    assert protos.shape == (6, 12)
    torch.testing.assert_close(protos.norm(dim=1), torch.ones(6))
    protos[:, 0].sum().backward()  # a loss on the prototypes alone reaches the classifier's weights
    assert model.classifier.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.prototype_head.parameters())


@pytest.mark.parametrize("backbone", ["resnet18", "resnet32"])
def test_sync_batch_norm_syncs_only_the_statistics_over_images(backbone):
    cfg = ModelConfig(backbone=backbone, small_input_stem=True, projection_dim=12, projection_hidden_dim=16,
                      norm="sync_batch", prototypes="classifier")
    model = JRCLNet(cfg, num_classes=6)
    norms = {name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d)}
    model.sync_batch_norms()
    synced = {name for name, m in model.named_modules() if isinstance(m, torch.nn.SyncBatchNorm)}
    kept = {name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d)}
    # every norm over a rank's images is synced; the prototype head's (over the classes'
    # weights, the same on every rank) stays a plain BatchNorm
    assert kept == {name for name in norms if name.startswith("prototype_head.")} and len(kept) == 1
    assert synced == norms - kept and any(name.startswith("backbone.") for name in synced)
    assert any(name.startswith("projection.") for name in synced)


def test_pretrained_weights_come_from_the_local_cache_or_a_clear_error(tmp_path, monkeypatch):
    import torchvision

    from jrcl_fast.errors import UserError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = ModelConfig(backbone="resnet18", small_input_stem=True, pretrained=True)
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    with pytest.raises(UserError, match=f"model.pretrained: {cached} does not exist; download {url}"):
        JRCLNet(cfg, 4)

    imagenet = torchvision.models.resnet18(weights=None).state_dict()  # fresh random "ImageNet" weights
    cached.parent.mkdir(parents=True)
    torch.save(imagenet, cached)
    backbone = JRCLNet(cfg, 4).backbone.state_dict()
    for name, value in backbone.items():
        if name.startswith("conv1."):  # the small stem replaces ImageNet's 7x7 stem
            assert value.shape != imagenet[name].shape
        else:
            torch.testing.assert_close(value, imagenet[name], rtol=0, atol=0)

    torch.save({k: v for k, v in imagenet.items() if not k.startswith("layer4.")}, cached)
    with pytest.raises(UserError, match="lack layer4"):  # never a silently random part
        JRCLNet(cfg, 4)
    for bad, message in ((dict(norm="group"), "trained with batch norm"), (dict(backbone="resnet32"), "no ImageNet")):
        with pytest.raises(UserError, match=message):
            JRCLNet(ModelConfig(**{"backbone": "resnet18", "pretrained": True, **bad}), 4)
