"""The black-box classifier oracle: building, loading (timm <-> torchvision, TorchScript, module:attr), errors."""

import pytest
import torch
from torch import nn

from bbzo.errors import ConfigError, OracleError
from bbzo.oracles.classifier import ClassifierOracle, build_classifier, load_classifier, load_weights, log_probs


class Small(nn.Module):
    """Importable as tests.oracles.test_classifier:Small (module:attr, a class built with no arguments)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def test_a_timm_resnet50_checkpoint_loads_into_torchvision_and_back(tmp_path):
    torch.manual_seed(0)
    timm_net = build_classifier("timm:resnet50", 10).eval()
    path = tmp_path / "timm_rn50.pt"
    torch.save(timm_net.state_dict(), path)
    tv = load_classifier("resnet50", path, num_classes=10)
    assert type(tv).__module__.startswith("torchvision")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(tv(x), timm_net(x), atol=1e-5)
    back_path = tmp_path / "tv_rn50.pt"
    torch.save(tv.state_dict(), back_path)
    back = load_classifier("timm:resnet50", back_path, num_classes=10)
    with torch.no_grad():
        assert torch.allclose(back(x), timm_net(x), atol=1e-5)


def test_a_corrupt_missing_or_foreign_weights_file_gets_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ConfigError, match="cannot read classifier weights .*re-export"):
        load_classifier("resnet18", bad, num_classes=10)
    with pytest.raises(ConfigError, match="do not exist"):
        load_classifier("resnet18", tmp_path / "missing.pt", num_classes=10)
    with pytest.raises(ConfigError, match="give its trained weights"):
        load_classifier("resnet18", None)
    other = tmp_path / "other.pt"
    torch.save(build_classifier("resnet18", 7).state_dict(), other)  # 7 classes, not 10
    with pytest.raises(ConfigError, match="shape mismatches .*fc.weight.*--num-classes"):
        load_classifier("resnet18", other, num_classes=10)
    with pytest.raises(ConfigError, match="torchvision has no model"):
        build_classifier("resnet_nonexistent", 10)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # TorchScript is deprecated in torch 2.14; still loaded
def test_torchscript_safetensors_and_module_attr_classifiers_load(tmp_path):
    net = Small().eval()
    x = torch.rand(3, 3, 8, 8)
    ts = tmp_path / "small.ts"
    torch.jit.save(torch.jit.script(net), str(ts))
    with torch.no_grad():
        assert torch.allclose(load_classifier(str(ts))(x), net(x))
    from safetensors.torch import save_file
    st = tmp_path / "small.safetensors"
    save_file(net.state_dict(), str(st))
    loaded = load_classifier("tests.oracles.test_classifier:Small", st)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x))
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    with pytest.raises(ConfigError, match="has no attribute"):
        load_classifier("tests.oracles.test_classifier:Nope")
    wrapped = {"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}
    torch.save(wrapped, tmp_path / "wrapped.pt")
    load_weights(Small(), tmp_path / "wrapped.pt")  # DataParallel prefix and a wrapper dict are accepted


def test_the_oracle_normalizes_batches_counts_and_refuses_gradients():
    seen = []

    def net(z):
        seen.append(z.shape[0])
        return torch.stack([z.mean((1, 2, 3)), -z.mean((1, 2, 3))], 1)

    o = ClassifierOracle(net, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), max_batch=4)
    x = torch.full((10, 3, 2, 2), 0.75)
    out = o.query(x)
    assert torch.allclose(out[:, 0], torch.ones(10))  # (0.75 - 0.5) / 0.25
    assert seen == [4, 4, 2] and o.rows_used == 10 and o.calls_used == 1
    with pytest.raises(OracleError, match="refuses inputs that require grad"):
        o.query(x.clone().requires_grad_())
    p = ClassifierOracle(net, mean=(0.5,) * 3, std=(0.25,) * 3, output="probs")
    probs = p.query(x)
    assert torch.allclose(probs.sum(1), torch.ones(10))
    assert torch.allclose(log_probs(probs, "probs"), log_probs(out, "logits"), atol=1e-6)
    with pytest.raises(ConfigError, match="one value per channel"):
        ClassifierOracle(net, mean=(0.5,), std=(0.2, 0.2))


def test_an_exported_program_loads(tmp_path):
    net = Small().eval()
    x = torch.rand(2, 3, 8, 8)
    path = tmp_path / "small.pt2"
    torch.export.save(torch.export.export(net, (x,)), str(path))
    with torch.no_grad():
        assert torch.allclose(load_classifier(str(path))(x), net(x))


def test_a_file_reference_a_compiled_file_with_weights_and_long_errors(tmp_path):
    net = Small().eval()
    x = torch.rand(2, 3, 8, 8)
    code = tmp_path / "my_clf.py"
    code.write_text("import torch\nfrom torch import nn\n\nclass Net(nn.Module):\n    def __init__(self):\n"
                    "        super().__init__()\n        self.conv = nn.Conv2d(3, 4, 3, padding=1)\n"
                    "        self.fc = nn.Linear(4, 5)\n\n    def forward(self, x):\n"
                    "        return self.fc(self.conv(x).mean((2, 3)))\n\n"
                    "class Broken(nn.Module):\n    def __init__(self):\n        raise ValueError('x' * 300 + ' the end')\n")
    weights = tmp_path / "w.pt"
    torch.save(net.state_dict(), weights)
    loaded = load_classifier(f"{code}:Net", weights)  # file.py:attr, as --oracle takes it
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x))
    ts = tmp_path / "traced.pt"
    torch.jit.save(torch.jit.trace(net, x), str(ts))
    with pytest.raises(ConfigError, match="holds its own weights; drop --weights"):
        load_classifier(str(ts), weights)  # was: "torchvision has no model '.../traced.pt'"
    with pytest.raises(ConfigError, match="It looks like a state dict: name the architecture and pass the file as --weights"):
        load_classifier(str(weights))
    with pytest.raises(ConfigError) as err:  # the user's message arrives whole (it used to be cut at 200 characters)
        load_classifier(f"{code}:Broken")
    assert "x" * 300 + " the end" in str(err.value)


def test_a_class_map_answers_the_mapped_classes_with_their_summed_probability():
    logits = torch.tensor([[1.0, 2.0, 3.0, -1.0], [0.5, -2.0, 0.0, 4.0]])
    o = ClassifierOracle(lambda z: logits[: z.shape[0]], mean=(0.0,) * 3, std=(1.0,) * 3, classes=[[1], [0, 2]])
    out = o.query(torch.zeros(2, 3, 2, 2))
    assert torch.allclose(out[:, 0], logits[:, 1])
    assert torch.allclose(out[:, 1], torch.logsumexp(logits[:, [0, 2]], 1))
    p = torch.softmax(logits, 1)  # the answer is the classifier restricted to the mapped outputs
    assert torch.allclose(torch.softmax(out, 1)[:, 1], (p[:, 0] + p[:, 2]) / (p[:, 0] + p[:, 1] + p[:, 2]))
    with pytest.raises(ConfigError, match="at least 2 classes"):
        ClassifierOracle(lambda z: z, classes=[[3]])
