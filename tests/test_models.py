"""Every form of MODEL that hookviz.models.load_model accepts (or refuses), built, saved and loaded here."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import ResNet18_Weights

from hookviz.errors import UsageError
from hookviz.forward import select_logits
from hookviz.hooks import capture
from hookviz.models import load_labels, load_model
from hookviz.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing


def _same_outputs(a: nn.Module, b: nn.Module, shape=(2, 3, 64, 64)) -> bool:
    x = torch.randn(*shape)
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """Architecture detection caches signatures under $XDG_CACHE_HOME: here a temporary folder, not ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


# --- (1) torchvision model names -------------------------------------------------------------------


def test_torchvision_name_with_random_weights():
    loaded = load_model("resnet18", weights="none", device="cpu")

    assert isinstance(loaded.module, torchvision.models.ResNet)
    assert not loaded.module.training
    assert loaded.labels is None  # random weights have no class names
    assert "resnet18" in loaded.description
    with torch.no_grad():
        assert loaded.module(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_bad_weights_member_lists_the_choices():
    with pytest.raises(UsageError) as info:
        load_model("resnet18", weights="IMAGENET9K_V7")

    message = str(info.value)
    assert "IMAGENET9K_V7" in message
    for choice in ("DEFAULT", "IMAGENET1K_V1", "none"):
        assert choice in message


def test_bad_weights_lists_each_choice_once():
    # DEFAULT is both hookviz's own keyword and an alias member of the weights enum.
    with pytest.raises(UsageError) as info:
        load_model("resnet18", weights="IMAGENET9K_V7")

    choices = [c.strip() for c in str(info.value).split("choose one of:")[1].split(",")]
    assert len(choices) == len(set(choices)), choices


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(UsageError, match="did you mean") as info:
        load_model("resnet81", weights="none")

    assert "resnet18" in str(info.value)


def test_missing_model_file_is_reported_as_not_found(tmp_path):
    missing = tmp_path / "nowhere" / "model.pt"

    with pytest.raises(UsageError, match="not found") as info:
        load_model(str(missing))

    assert str(missing) in str(info.value)


def test_model_spec_that_is_a_directory_is_refused(tmp_path):
    with pytest.raises(UsageError, match="directory"):
        load_model(str(tmp_path))


# --- (2) state_dict files ------------------------------------------------------------------------


def test_state_dict_with_arch_given(saved_models, resnet18_10):
    loaded = load_model(str(saved_models["state_dict"]), arch="resnet18", device="cpu")

    assert "resnet18" in loaded.description and "given" in loaded.description
    assert _same_outputs(loaded.module, resnet18_10)


@pytest.fixture(scope="module")
def detected(saved_models):
    """Loading without --arch compares the file with every torchvision architecture: do it once for the module."""
    return load_model(str(saved_models["state_dict"]), device="cpu")


def test_state_dict_without_arch_is_detected_as_resnet18(detected, resnet18_10):
    assert isinstance(detected.module, torchvision.models.ResNet)
    assert "resnet18" in detected.description and "detected" in detected.description
    assert _same_outputs(detected.module, resnet18_10)


def test_detected_state_dict_infers_num_classes(detected):
    with torch.no_grad():
        logits = detected.module(torch.randn(3, 3, 64, 64))

    assert logits.shape == (3, 10)
    assert detected.module.fc.out_features == 10
    assert detected.labels is None  # ImageNet's 1000 names do not fit 10 classes
    assert "10 classes" in detected.description


def test_state_dict_that_matches_no_architecture_asks_for_arch(saved_models):
    with pytest.raises(UsageError, match="--arch"):
        load_model(str(saved_models["unknown_state_dict"]))


def test_state_dict_that_does_not_fit_the_given_arch(saved_models):
    with pytest.raises(UsageError, match="does not fit --arch resnet34"):
        load_model(str(saved_models["state_dict"]), arch="resnet34")


def test_unknown_arch_suggests_close_names(saved_models):
    with pytest.raises(UsageError, match="did you mean.*resnet18"):
        load_model(str(saved_models["state_dict"]), arch="resnet_18")


@pytest.mark.parametrize("form", ["wrapped", "data_parallel"])
def test_checkpoint_layouts_are_unwrapped(saved_models, resnet18_10, form):
    # {"state_dict": sd, "epoch": 3} and DataParallel's "module." prefixes both load as plain state_dicts.
    loaded = load_model(str(saved_models[form]), arch="resnet18", device="cpu")

    assert _same_outputs(loaded.module, resnet18_10)


def test_a_file_holding_something_else_is_refused(saved_models):
    with pytest.raises(UsageError, match="not a state_dict"):
        load_model(str(saved_models["not_a_state_dict"]))


def test_a_file_that_is_not_a_pytorch_file_is_refused(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello, I am not a checkpoint\n")

    with pytest.raises(UsageError, match="cannot read"):
        load_model(str(path))


# --- (3) torch.export programs -------------------------------------------------------------------


def test_exported_program_loads_with_its_input_size(exported_program):
    path, original = exported_program

    loaded = load_model(str(path), device="cpu")

    assert loaded.preprocessing.input_size == (32, 32)
    assert "torch.export" in loaded.description
    x = torch.randn(3, 3, 32, 32)  # a batch size other than the one exported with
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), original(x), atol=1e-5)


def test_exported_program_supports_hooks_and_gradients(exported_program):
    path, original = exported_program
    loaded = load_model(str(path), device="cpu")
    names = [name for name, _ in loaded.module.named_modules()]
    assert "features.0" in names and "features.2" in names

    x = torch.randn(1, 3, 32, 32)
    with capture(loaded.module, ["features.0", "features.2"], grad=True) as activations:
        logits = loaded.module(x)
    (gradient,) = torch.autograd.grad(logits[0, 1], activations["features.2"])

    # The same quantities from the eager model the program was exported from.
    with torch.no_grad():
        expected_conv0 = original.features[0](x)
    assert torch.allclose(activations["features.0"], expected_conv0, atol=1e-5)
    assert activations["features.2"].shape == (1, 4, 32, 32)
    # logits = head(mean over positions): d logit_1 / d act[c, i, j] = head.weight[1, c] / (32 * 32)
    expected_grad = (original.head.weight[1] / (32 * 32)).view(1, 4, 1, 1).expand(1, 4, 32, 32)
    assert torch.allclose(gradient, expected_grad, atol=1e-7)


# --- (4) pickled modules -------------------------------------------------------------------------


def test_pickled_module_is_refused_without_trust(pickled_module):
    path, _ = pickled_module

    with pytest.raises(UsageError, match="--trust"):
        load_model(str(path))


def test_pickled_module_loads_with_trust(pickled_module, nets):
    path, original = pickled_module

    loaded = load_model(str(path), trust=True, device="cpu")

    assert isinstance(loaded.module, nets.TinyConvNet)
    assert _same_outputs(loaded.module, original, shape=(2, 3, 16, 16))


# --- (5) TorchScript -----------------------------------------------------------------------------


def test_torchscript_is_refused_with_the_alternatives(torchscript_file):
    with pytest.raises(UsageError) as info:
        load_model(str(torchscript_file))

    message = str(info.value)
    assert "TorchScript" in message
    assert ".pt2" in message and "--arch" in message


# --- (6) package.module:callable -----------------------------------------------------------------


def test_callable_spec_builds_the_model_from_the_current_directory(callable_project):
    loaded = load_model("mymod:build_tinyconvnet", device="cpu")

    assert type(loaded.module).__name__ == "TinyConvNet"
    assert "mymod:build_tinyconvnet" in loaded.description


def test_callable_spec_with_state_dict_loads_the_weights(callable_project):
    torch.manual_seed(123)
    original = load_model("mymod:build_tinyconvnet", device="cpu").module
    weights = callable_project / "weights.pt"
    torch.save({"state_dict": original.state_dict(), "epoch": 7}, weights)

    fresh = load_model("mymod:build_tinyconvnet", device="cpu")
    with_weights = load_model("mymod:build_tinyconvnet", state_dict=str(weights), device="cpu")

    assert not _same_outputs(fresh.module, original, shape=(2, 3, 16, 16))  # the builder alone: a new random init
    assert _same_outputs(with_weights.module, original, shape=(2, 3, 16, 16))
    assert str(weights) in with_weights.description


def test_callable_spec_errors_are_usage_errors(callable_project):
    with pytest.raises(UsageError, match="no attribute"):
        load_model("mymod:nothing_here")
    with pytest.raises(UsageError, match="cannot import"):
        load_model("no_such_module_xyz:build")
    with pytest.raises(UsageError, match="not found"):
        load_model("mymod:build_tinyconvnet", state_dict="missing_weights.pt")


def test_state_dict_option_is_refused_for_a_torchvision_name(tmp_path):
    with pytest.raises(UsageError, match="--state-dict"):
        load_model("resnet18", weights="none", state_dict=str(tmp_path / "w.pt"))


# --- preprocessing -------------------------------------------------------------------------------


def test_imagenet_constants_equal_torchvision_defaults():
    from torchvision.transforms._presets import ImageClassification

    parameters = inspect.signature(ImageClassification.__init__).parameters
    assert IMAGENET_MEAN == tuple(parameters["mean"].default)
    assert IMAGENET_STD == tuple(parameters["std"].default)


def test_resnet18_preprocessing_is_the_weights_eval_transform():
    reference = ResNet18_Weights.DEFAULT.transforms()

    prep = load_model("resnet18", weights="none").preprocessing

    assert prep.input_size == (reference.crop_size[0], reference.crop_size[0])
    assert prep.resize_size == reference.resize_size[0]
    assert prep.mean == tuple(reference.mean)
    assert prep.std == tuple(reference.std)
    assert prep.interpolation == reference.interpolation.value


def test_size_mean_std_overrides():
    prep = load_model(
        "resnet18", weights="none", size=(64, 48), mean=(0.5, 0.5, 0.5), std=(0.25, 0.2, 0.1)
    ).preprocessing

    assert prep == Preprocessing(
        input_size=(64, 48),
        resize_size=round(48 * 256 / 224),  # the shorter side, in ImageNet's 256:224 proportion
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.2, 0.1),
        interpolation="bilinear",
    )


# --- labels and outputs --------------------------------------------------------------------------


def test_imagenet_labels():
    labels = load_labels("imagenet")

    assert len(labels) == 1000
    assert labels[281] == "tabby"


def test_labels_from_a_text_file_and_a_json_list(tmp_path):
    text = tmp_path / "classes.txt"
    text.write_text("cat\n\n  dog  \nbird\n")
    listed = tmp_path / "classes.json"
    listed.write_text(json.dumps(["cat", "dog", 3]))

    assert load_labels(str(text)) == ["cat", "dog", "bird"]
    assert load_labels(str(listed)) == ["cat", "dog", "3"]
    with pytest.raises(UsageError, match="not a file"):
        load_labels(str(tmp_path / "nope.txt"))


def test_labels_option_replaces_the_models_labels(tmp_path):
    text = tmp_path / "classes.txt"
    text.write_text("a\nb\n")

    loaded = load_model("resnet18", weights="none", labels=str(text))

    assert loaded.label(1) == "b"
    assert loaded.label(5) == "class 5"


def test_select_logits_from_tuple_dict_and_logits_key():
    scores, other = torch.randn(2, 5), torch.randn(2, 7)

    assert select_logits(scores) is scores
    assert select_logits((scores, other)) is scores
    assert select_logits((None, scores)) is scores  # the first tensor
    assert select_logits({"aux": other, "logits": scores}) is scores  # "logits" wins over order
    assert select_logits({"out": scores, "aux": other}) is scores
    assert select_logits({"out": other, "aux": scores}, "aux") is scores
    assert select_logits((other, scores), "1") is scores


def test_select_logits_errors():
    with pytest.raises(UsageError, match="no key 'missing'"):
        select_logits({"out": torch.zeros(1)}, "missing")
    with pytest.raises(UsageError, match="drop --output"):
        select_logits(torch.zeros(1), "out")
    with pytest.raises(UsageError):
        select_logits(("text", 3))
