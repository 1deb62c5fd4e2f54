import pytest
import torch
from torch import nn

from lora_core import AdapterConfig, AdapterSet, find_targets
from lora_core.adapters import AdapterSpec, LoRAModule
from tiny_models import make_unet


def _snapshot(module: nn.Module):
    return (
        [(n, type(m)) for n, m in module.named_modules()],
        {k: v.clone() for k, v in module.state_dict().items()},
        sum(len(m._forward_hooks) for m in module.modules()),
    )


def test_presets_select_the_expected_layers():
    unet = make_unet()
    attn = {s.name for s in find_targets(unet, "unet", "attn", AdapterConfig())}
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in attn
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0" in attn
    assert not any("ff.net" in n or "proj_in" in n for n in attn)
    assert len(attn) == 2 * 2 * 4  # 2 blocks x (attn1, attn2) x (q, k, v, out)

    attn_ff = {s.name for s in find_targets(unet, "unet", "attn+ff", AdapterConfig())}
    assert attn < attn_ff
    assert "unet.down_blocks.0.attentions.0.proj_in" in attn_ff
    assert "unet.up_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj" in attn_ff
    assert "unet.up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2" in attn_ff
    assert not any("resnets" in n for n in attn_ff)

    locon = {s.name for s in find_targets(unet, "unet", "attn+ff", AdapterConfig(algorithm="locon", conv_rank=2))}
    assert "unet.down_blocks.0.resnets.0.conv1" in locon
    assert "unet.down_blocks.0.downsamplers.0.conv" in locon
    assert "unet.down_blocks.0.resnets.0.time_emb_proj" not in locon  # Linear outside the targets

    everything = find_targets(unet, "unet", "all", AdapterConfig())
    n_layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in unet.modules())
    assert len(everything) == n_layers


def test_fresh_adapters_do_not_change_the_output_and_remove_restores_the_tree():
    unet = make_unet()
    before = _snapshot(unet)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 7, 16)
    ref = unet(x, t, ctx)
    adapters = AdapterSet.create({"unet": unet}, AdapterConfig(rank=4, algorithm="locon"), seed=0)
    with adapters.attach({"unet": unet}):
        assert torch.allclose(unet(x, t, ctx), ref)  # up starts at zero
        with torch.no_grad():
            for _, m in adapters.items():
                m.lora_up.weight.normal_()
        assert not torch.allclose(unet(x, t, ctx), ref)
    after = _snapshot(unet)
    assert before[0] == after[0]
    assert before[2] == after[2] == 0
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    assert torch.equal(unet(x, t, ctx), ref)


def test_two_adapter_sets_on_one_shared_tree_do_not_leak_into_each_other():
    unet = make_unet()
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([100]), torch.randn(1, 7, 16)
    a = AdapterSet.create({"unet": unet}, AdapterConfig(rank=2), seed=1)
    b = AdapterSet.create({"unet": unet}, AdapterConfig(rank=2), seed=2)
    with torch.no_grad():
        for s in (a, b):
            for _, m in s.items():
                m.lora_up.weight.normal_()
    with a.attach({"unet": unet}):
        out_a = unet(x, t, ctx)
    with b.attach({"unet": unet}):
        out_b = unet(x, t, ctx)
    with a.attach({"unet": unet}):
        assert torch.equal(unet(x, t, ctx), out_a)
    assert not torch.allclose(out_a, out_b)


def test_seed_covers_adapter_initialisation():
    unet = make_unet()
    w1 = AdapterSet.create({"unet": unet}, AdapterConfig(rank=4), seed=7).weights()
    w2 = AdapterSet.create({"unet": unet}, AdapterConfig(rank=4), seed=7).weights()
    w3 = AdapterSet.create({"unet": unet}, AdapterConfig(rank=4), seed=8).weights()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert any(not torch.equal(w1[k], w3[k]) for k in w1 if "down" in k)
    assert all(torch.count_nonzero(w1[k]) == 0 for k in w1 if "lora_up" in k)


@pytest.mark.parametrize("rslora", [False, True])
def test_linear_delta_matches_peft_lora_layer(rslora):
    peft_lora = pytest.importorskip("peft.tuners.lora.layer")
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    ours = LoRAModule(AdapterSpec("unet.l", "linear", 12, 10, rank=4, alpha=8.0), use_rslora=rslora)
    ours.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours.lora_up.weight.normal_()
    from peft import LoraConfig

    cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=rslora)
    ref = peft_lora.Linear(base, "default", config=cfg, r=4, lora_alpha=8, use_rslora=rslora)
    with torch.no_grad():
        ref.lora_A["default"].weight.copy_(ours.lora_down.weight)
        ref.lora_B["default"].weight.copy_(ours.lora_up.weight)
    x = torch.randn(3, 12)
    assert torch.allclose(base(x) + ours(x), ref(x), atol=1e-6)


def test_conv_delta_matches_peft_lora_layer():
    peft_lora = pytest.importorskip("peft.tuners.lora.layer")
    torch.manual_seed(0)
    base = nn.Conv2d(6, 8, 3, stride=2, padding=1)
    spec = AdapterSpec("unet.c", "conv", 6, 8, rank=3, alpha=3.0, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1))
    ours = LoRAModule(spec)
    with torch.no_grad():
        ours.lora_down.weight.normal_()
        ours.lora_up.weight.normal_()
    from peft import LoraConfig

    ref = peft_lora.Conv2d(base, "default", config=LoraConfig(r=3, lora_alpha=3), r=3, lora_alpha=3)
    with torch.no_grad():
        ref.lora_A["default"].weight.copy_(ours.lora_down.weight)
        ref.lora_B["default"].weight.copy_(ours.lora_up.weight)
    x = torch.randn(2, 6, 9, 9)
    assert torch.allclose(base(x) + ours(x), ref(x), atol=1e-5)


def test_no_matching_target_is_a_clear_error():
    with pytest.raises(ValueError, match="no layer matched"):
        AdapterSet.create({"unet": make_unet()}, AdapterConfig(unet_targets=("does_not_exist",)))


def test_load_weights_names_the_mismatching_key():
    unet = make_unet()
    a = AdapterSet.create({"unet": unet}, AdapterConfig(rank=4, unet_targets="attn"))
    w = dict(a.weights())
    key = next(iter(w))
    w[key] = torch.zeros(99, 1)
    with pytest.raises(ValueError, match=f"shape mismatch for {key}"):
        a.load_weights(w)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_attached_hook_matches_peft_in_output_and_gradients(kind):
    """The hook's fused path (functional calls, scale folded into the add) is the same maths as peft's layer."""
    peft_lora = pytest.importorskip("peft.tuners.lora.layer")
    from peft import LoraConfig

    torch.manual_seed(0)
    if kind == "linear":
        base = nn.Linear(12, 10)
        spec = AdapterSpec("unet.layer", "linear", 12, 10, rank=4, alpha=8.0)
        x = torch.randn(3, 5, 12)
    else:
        base = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        spec = AdapterSpec("unet.layer", "conv", 6, 8, rank=4, alpha=8.0, kernel_size=(3, 3), stride=(2, 2),
                           padding=(1, 1))
        x = torch.randn(2, 6, 9, 9)
    root = nn.Module()
    root.layer = base
    adapters = AdapterSet([spec], AdapterConfig(rank=4, alpha=8.0))
    ours = adapters["unet.layer"]
    assert ours.scale == 2.0  # the torch.add(alpha=...) path
    with torch.no_grad():
        ours.lora_down.weight.normal_()
        ours.lora_up.weight.normal_()
    cls = peft_lora.Linear if kind == "linear" else peft_lora.Conv2d
    ref = cls(base, "default", config=LoraConfig(r=4, lora_alpha=8), r=4, lora_alpha=8)
    with torch.no_grad():
        ref.lora_A["default"].weight.copy_(ours.lora_down.weight)
        ref.lora_B["default"].weight.copy_(ours.lora_up.weight)
    base.requires_grad_(False)
    with adapters.attach({"unet": root}):
        out = root.layer(x)
    expected = ref(x)
    assert torch.allclose(out, expected, atol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert torch.allclose(ours.lora_down.weight.grad, ref.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(ours.lora_up.weight.grad, ref.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-4)


def test_dropout_applies_in_training_only():
    spec = AdapterSpec("unet.l", "linear", 16, 16, rank=4, alpha=4.0)
    module = LoRAModule(spec, dropout=0.5)
    with torch.no_grad():
        module.lora_down.weight.normal_()
        module.lora_up.weight.normal_()
    x = torch.randn(8, 16)
    module.eval()
    clean = module(x)
    assert torch.equal(module(x), clean)
    module.train()
    torch.manual_seed(0)
    dropped = module(x)
    assert not torch.allclose(dropped, clean)
    torch.manual_seed(0)
    mask_x = torch.nn.functional.dropout(x, 0.5, training=True)
    assert torch.allclose(dropped, module.eval()(mask_x))


class HostLinear(nn.Module):
    """A host's Linear that is not an ``nn.Linear``: ComfyUI >= 0.3.7x runs every Linear of a quantized checkpoint as
    such a mixed-precision layer (its weight a quantized tensor subclass), declaring in/out features."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features) * 0.1, requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


def _host_linear_unet():
    """The tiny UNet with every nn.Linear swapped for a HostLinear carrying the same weights."""
    unet = make_unet()
    for module in list(unet.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                host = HostLinear(child.in_features, child.out_features)
                host.weight.data.copy_(child.weight.data)
                if child.bias is not None:
                    host.bias.data.copy_(child.bias.data)
                setattr(module, child_name, host)
    return unet


@pytest.mark.parametrize("targets", ["attn", "attn+ff", "all"])
def test_layers_are_found_by_what_they_compute_not_their_class(targets):
    """Every target of a plain model is found on the same model built from host (non-nn.Linear) layers: the same
    names, kinds and shapes, so a quantized checkpoint trains every layer its targets name."""
    plain = find_targets(make_unet(), "unet", targets, AdapterConfig())
    host = find_targets(_host_linear_unet(), "unet", targets, AdapterConfig())
    assert [(s.name, s.kind, s.in_features, s.out_features) for s in host] == \
           [(s.name, s.kind, s.in_features, s.out_features) for s in plain]
    assert any(s.kind == "linear" for s in host)


def test_an_adapter_on_a_host_layer_gives_the_same_output_and_gradients_as_on_nn_linear():
    torch.manual_seed(0)
    plain, host = make_unet(), _host_linear_unet()
    config = AdapterConfig(rank=4, alpha=4, unet_targets="attn+ff")
    outs, grads = [], []
    for unet in (plain, host):
        adapters = AdapterSet.create({"unet": unet}, config, seed=7)
        for m in adapters.adapters:  # a non-zero up, so the delta shows
            nn.init.normal_(m.lora_up.weight, std=0.1, generator=torch.Generator().manual_seed(1))
        x, t, ctx = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([10, 500]), \
            torch.randn(2, 77, 16, generator=torch.Generator().manual_seed(3))
        with adapters.attach({"unet": unet}):
            out = unet(x, t, ctx)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in adapters.parameters()])
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_a_targeted_layer_no_adapter_can_sit_on_is_an_error_naming_it_and_its_type():
    from lora_core import UnadaptableLayerError

    class Experts(nn.Module):  # a 3-D weight (mixture of experts): not a Linear
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(4, 8, 16))

    unet = make_unet()
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    block.attn1.to_q = Experts()
    with pytest.raises(UnadaptableLayerError, match=r"attn1\.to_q \(.*Experts, weight \(4, 8, 16\)\)"):
        find_targets(unet, "unet", "attn", AdapterConfig())
    grouped = make_unet()
    grouped.down_blocks[0].resnets[0].conv1 = nn.Conv2d(32, 32, 3, padding=1, groups=2)
    with pytest.raises(UnadaptableLayerError, match=r"resnets\.0\.conv1 .*Conv2d"):
        find_targets(grouped, "unet", "all", AdapterConfig())
    assert find_targets(grouped, "unet", "attn", AdapterConfig())  # not targeted: no complaint


class _SelfAttention(nn.Module):  # a DiT's attention: fused qkv and an output projection
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)


class _Block(nn.Module):  # modulation, attention in a module of its own class, an MLP in a plain Sequential
    def __init__(self) -> None:
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(8, 48))
        self.attn = _SelfAttention()
        self.cross_attn = nn.ModuleDict({"to_q": nn.Linear(8, 8), "to_out": nn.Linear(8, 8)})  # its class says nothing
        self.mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))


class MLPEmbedder(nn.Module):  # FLUX-style timestep embedder: an MLP by its class name, an embedding by its role
    def __init__(self) -> None:
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(4, 8), nn.Linear(8, 8)


class AttentionPool(nn.Module):  # HunyuanDiT's text pooler: attention by its class name, a pooler by its role
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.c_proj = nn.Linear(8, 8), nn.Linear(8, 8)


class _DiT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.x_embedder, self.blocks, self.final = nn.Linear(4, 8), nn.ModuleList([_Block(), _Block()]), nn.Linear(8, 4)
        self.time_in, self.pooler = MLPEmbedder(), AttentionPool()


def test_structural_targets_find_attention_and_mlp_layers_by_structure_in_every_block():
    """A model no preset names: attention by its class (or its path and q/k/v/out leaf names), the MLP by its path;
    modulation, embedding and output layers only with ``all``. The patterns cover every block; adapters land on
    exactly those layers."""
    from lora_core.adapters import structural_targets

    net = _DiT()
    found = structural_targets(net)
    assert found["attn"] == (r"re:blocks\.\d+\.attn\.qkv", r"re:blocks\.\d+\.attn\.proj",
                             r"re:blocks\.\d+\.cross_attn\.to_q", r"re:blocks\.\d+\.cross_attn\.to_out")
    assert found["attn+ff"] == found["attn"] + (r"re:blocks\.\d+\.mlp\.0", r"re:blocks\.\d+\.mlp\.2")
    adapters = AdapterSet.create({"unet": net}, AdapterConfig(rank=2, unet_targets=found["attn+ff"]))
    names = sorted(adapters.specs)
    assert len(names) == 12 and all(".adaLN" not in n and "embedder" not in n and "final" not in n for n in names)
    assert not any(n.startswith(("unet.time_in", "unet.pooler")) for n in names)
    assert {n.split(".")[2] for n in names} == {"0", "1"}
