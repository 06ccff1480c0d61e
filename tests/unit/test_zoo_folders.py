"""timm and transformers model folders as models: read (labels, settings, the user's keys winning),
refused with a clear error naming the file when they cannot be served, and classified by the
library with the answers of the zoo's own pipeline in fp32."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from handler.classifier import ImageClassifier
from handler.model.files import read_model
from handler.model.zoo import ZooFolderError, imagenet_labels
from harness.zoo_folders import (LABELS, PARITY_CASES, assert_answers_match, hf_folder, hf_reference, photos, reference_answers,
                         timm_folder)

PHOTOS = [data for _, data in photos()]


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="module")
def timm_resnet(zoo_dir):
    return timm_folder(zoo_dir / "resnet18-a1", "resnet18.a1_in1k")


@pytest.fixture(scope="module")
def hf_vit(zoo_dir):
    return hf_folder(zoo_dir / "vit", "vit")


def copy_of(folder, tmp_path, name="model"):
    return shutil.copytree(folder, tmp_path / name)


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ---- answers --------------------------------------------------------------------------------

@pytest.mark.parametrize("case", PARITY_CASES, ids=[case.name for case in PARITY_CASES])
def test_library_answers_equal_the_zoos_own_pipeline_in_fp32(zoo_dir, case):
    folder = case.build(zoo_dir / case.name)
    want = case.reference(folder, PHOTOS)
    assert len(set(want.argmax(1).tolist())) > 1, "the model answers one class for every photo"
    with ImageClassifier.load(folder, device="cpu", overrides={"precision": "fp32", "top_k": 3}) as clf:
        assert clf.labels == LABELS
        got = clf.classify(PHOTOS)
    assert_answers_match(got, want, LABELS)


def test_bf16_and_compile_apply_to_zoo_models(hf_vit, real_compiler):
    """What the project does for its models applies: bf16 weights (kept, not fallen back from),
    torch.compile of a batch bucket; answers still those of the fp32 zoo pipeline at top-1."""
    want = reference_answers(*hf_reference(hf_vit), PHOTOS)
    settings = {"precision": "bf16", "runtime": "torch", "compile": True, "batch_size": 8, "batch_buckets": [8]}
    with ImageClassifier.load(hf_vit, device="cpu", overrides=settings) as clf:
        assert clf.pipeline.precision == "bf16"
        assert clf.pipeline.runner.compiled_buckets == (8,)
        got = clf.classify(PHOTOS)
    agree = sum(next(iter(a)) == LABELS[int(row.argmax())] for a, row in zip(got, want))
    assert agree >= len(PHOTOS) - 1, agree


# ---- reading --------------------------------------------------------------------------------

def test_timm_folder_reads_as_a_model(timm_resnet):
    spec = read_model(timm_resnet)
    assert spec.name == "resnet18-a1" and spec.labels == LABELS and spec.config.arch == "timm"
    c = spec.config
    assert (c.image_size, c.resize_size, c.resize_mode, c.interpolation, c.crop_offset) == (
        224, 235, "center_crop", "bicubic", "round")
    assert c.jpeg_draft is False  # the zoos decode in full


def test_timm_label_descriptions_name_the_classes(timm_resnet, tmp_path):
    folder = copy_of(timm_resnet, tmp_path)
    edit_json(folder / "config.json", label_names=[f"n{i:08d}" for i in range(10)],
              label_descriptions={f"n{i:08d}": f"thing {i}" for i in range(10)})
    assert read_model(folder).labels == [f"thing {i}" for i in range(10)]


def test_a_1000_class_model_without_labels_gets_imagenets(zoo_dir, caplog):
    folder = timm_folder(zoo_dir / "imagenet", "resnet18.tv_in1k", num_classes=1000, labels=None, sensitive=False)
    with caplog.at_level("INFO"):
        spec = read_model(folder)
    assert spec.labels == imagenet_labels() and spec.labels[0] == "tench"
    assert "ImageNet-1k labels" in caplog.text


def test_transformers_folder_reads_id2label_and_its_processor(hf_vit):
    spec = read_model(hf_vit)
    assert spec.labels == LABELS and spec.config.arch == "transformers"
    c = spec.config
    assert (c.image_size, c.resize_mode, c.interpolation, c.crop_offset) == (224, "squash", "bilinear", "floor")
    assert c.mean == pytest.approx((0.5,) * 3) and c.std == pytest.approx((0.5,) * 3)


def test_transformers_placeholder_labels_on_1000_classes_are_imagenets(zoo_dir):
    folder = hf_folder(zoo_dir / "vit-1000", "vit", num_labels=1000, labels=None, sensitive=False)
    assert read_model(folder).labels == imagenet_labels()


def test_the_users_keys_win_over_the_folders(timm_resnet, tmp_path):
    folder = copy_of(timm_resnet, tmp_path)
    (folder / "model-config.yaml").write_text(yaml.safe_dump({"handler": {"interpolation": "bilinear", "top_k": 2}}))
    spec = read_model(folder, {"batch_size": 4})
    assert (spec.config.interpolation, spec.config.top_k, spec.config.batch_size) == ("bilinear", 2, 4)
    assert spec.config.resize_size == 235  # the rest is still the folder's
    (folder / "index_to_name.json").write_text(json.dumps({str(i): f"mine {i}" for i in range(10)}))
    assert read_model(folder).labels == [f"mine {i}" for i in range(10)]


def test_pytorch_model_bin_weights_load_too(zoo_dir):
    folder = timm_folder(zoo_dir / "bin", "resnet18.tv_in1k", safetensors=False, sensitive=False)
    assert (folder / "pytorch_model.bin").is_file() and not (folder / "model.safetensors").exists()
    with ImageClassifier.load(folder, device="cpu", overrides={"precision": "fp32"}) as clf:
        assert len(clf.classify(PHOTOS[:2])) == 2


# ---- bad input: each a clear error naming the file and what was expected ---------------------

def test_a_folder_that_is_neither_layout(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 3}))
    with pytest.raises(ZooFolderError, match=r"config\.json is neither a timm config .* nor a transformers one"):
        read_model(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"index_to_name\.json is missing .* or give a timm or "
                                                r"transformers model folder"):
        read_model(tmp_path)


def test_a_config_json_that_does_not_load(timm_resnet, tmp_path):
    folder = copy_of(timm_resnet, tmp_path)
    (folder / "config.json").write_text('{"architecture": "resnet18", ')
    with pytest.raises(ZooFolderError, match=r"config\.json is not valid JSON"):
        read_model(folder)


def test_an_architecture_timm_does_not_know(timm_resnet, tmp_path):
    folder = copy_of(timm_resnet, tmp_path)
    edit_json(folder / "config.json", architecture="resnet_made_up")
    spec = read_model(folder)  # the preprocessing reads; the model cannot be built
    with pytest.raises(ZooFolderError, match=r"config\.json: architecture 'resnet_made_up' is not a model timm"):
        ImageClassifier.load(folder, device="cpu")
    assert spec.config.arch == "timm"


def test_a_missing_weights_file(timm_resnet, hf_vit, tmp_path):
    for source in (timm_resnet, hf_vit):
        folder = copy_of(source, tmp_path, source.name)
        (folder / "model.safetensors").unlink()
        with pytest.raises(FileNotFoundError, match=r"weights are missing: expected model\.safetensors or "
                                                    r"pytorch_model\.bin"):
            read_model(folder)


@pytest.mark.parametrize("source", ["timm", "transformers"])
def test_an_unreadable_weights_file(timm_resnet, hf_vit, tmp_path, source):
    folder = copy_of(timm_resnet if source == "timm" else hf_vit, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ZooFolderError, match=r"model\.safetensors cannot be loaded"):
        ImageClassifier.load(folder, device="cpu")


def test_weights_whose_shapes_do_not_fit_the_architecture(timm_resnet, hf_vit, tmp_path):
    folder = copy_of(timm_resnet, tmp_path, "timm")
    edit_json(folder / "config.json", architecture="resnet34")
    with pytest.raises(ZooFolderError, match=r"weights in .*model\.safetensors do not fit timm architecture "
                                             r"'resnet34'"):
        ImageClassifier.load(folder, device="cpu")
    folder = copy_of(hf_vit, tmp_path, "hf")
    edit_json(folder / "config.json", hidden_size=96, intermediate_size=192)
    with pytest.raises(ZooFolderError, match=r"model\.safetensors cannot be loaded into ViTForImageClassification"):
        ImageClassifier.load(folder, device="cpu")


def test_weights_that_leave_tensors_unloaded(hf_vit, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_of(hf_vit, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["classifier.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ZooFolderError, match=r"do not fit ViTForImageClassification: missing keys: "
                                             r"\['classifier.weight'\]"):
        ImageClassifier.load(folder, device="cpu")


def test_labels_whose_count_differs_from_the_classes(timm_resnet, hf_vit, tmp_path):
    folder = copy_of(timm_resnet, tmp_path, "timm")
    edit_json(folder / "config.json", label_names=LABELS[:9])
    with pytest.raises(ZooFolderError, match=r"config\.json has 9 labels but the model has 10 classes"):
        read_model(folder)
    (folder / "index_to_name.json").write_text(json.dumps({str(i): str(i) for i in range(11)}))
    with pytest.raises(ZooFolderError, match=r"index_to_name\.json has 11 labels but the model has 10 classes"):
        read_model(folder)


def test_a_model_without_labels_and_not_1000_classes(zoo_dir):
    folder = timm_folder(zoo_dir / "no-labels", "resnet18.tv_in1k", labels=None, sensitive=False)
    with pytest.raises(ZooFolderError, match=r"names no labels for the model's 10 classes"):
        read_model(folder)


def test_not_an_image_classifier(hf_vit, tmp_path):
    folder = copy_of(hf_vit, tmp_path)
    edit_json(folder / "config.json", architectures=["ViTModel"])
    with pytest.raises(ZooFolderError, match=r"architectures \['ViTModel'\].* is not a transformers image "
                                             r"classification model"):
        read_model(folder)


@pytest.mark.parametrize(("processor", "message"), [
    pytest.param(None, r"preprocessor_config\.json is missing", id="missing"),
    pytest.param({"image_processor_type": "MobileViTImageProcessor"},
                 r"image processor MobileViTImageProcessor is not one the pipeline reproduces", id="unknown-type"),
    pytest.param({"image_processor_type": "ViTImageProcessor", "resample": 1},
                 r"resample 1 \(lanczos\) cannot be reproduced", id="lanczos"),
    pytest.param({"image_processor_type": "ViTImageProcessor", "size": {"height": 224, "width": 320}},
                 r"size 224x320 is not square", id="not-square"),
    pytest.param({"image_processor_type": "ViTImageProcessor", "do_resize": False},
                 r"do_resize is false", id="no-resize"),
    pytest.param({"image_processor_type": "BitImageProcessor", "do_center_crop": False},
                 r"shortest_edge 224 without a centre crop gives each image its own shape", id="no-crop"),
    pytest.param({"image_processor_type": "ViTImageProcessor", "do_pad": True}, r"do_pad is not reproduced",
                 id="pad"),
    pytest.param("not json", r"preprocessor_config\.json is not valid JSON", id="not-json"),
])
def test_a_processor_the_pipeline_cannot_reproduce(hf_vit, tmp_path, processor, message):
    folder = copy_of(hf_vit, tmp_path)
    target = folder / "preprocessor_config.json"
    if processor is None:
        target.unlink()
    else:
        target.write_text(processor if isinstance(processor, str) else json.dumps(processor))
    with pytest.raises(ZooFolderError, match=message):
        read_model(folder)


@pytest.mark.parametrize(("data_config", "message"), [
    pytest.param({"interpolation": "lanczos"}, r"interpolation 'lanczos' cannot be reproduced", id="lanczos"),
    pytest.param({"input_size": (3, 224, 192)}, r"input_size 224x192 is not square", id="not-square"),
    pytest.param({"crop_mode": "zoom"}, r"crop_mode 'zoom' is not one timm's evaluation transform knows",
                 id="crop-mode"),
    pytest.param({"crop_pct": 1.1}, r"crop_pct 1\.1 above 1 in crop_mode center would pad", id="crop-pct-above-1"),
    pytest.param({"crop_pct": None, "mean": [0.5, 0.5]}, r"mean must be 3 numbers \(RGB\), got \[0\.5, 0\.5\]",
                 id="two-means"),
    pytest.param({"input_size": [224, 224]}, r"input_size must be \[channels, height, width\]", id="input-size"),
    pytest.param({"mean": [2.0, 0.5, 0.5]}, r"mean \[2\.0, 0\.5, 0\.5\] must be within 0\.\.1", id="mean-range"),
])
def test_a_timm_config_the_pipeline_cannot_reproduce(timm_resnet, tmp_path, data_config, message):
    folder = copy_of(timm_resnet, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"].update(data_config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ZooFolderError, match=message):
        read_model(folder)


def test_use_test_size_is_for_timm_folders(hf_vit):
    with pytest.raises(ZooFolderError, match="use_test_size applies to timm folders only"):
        read_model(hf_vit, {"use_test_size": True})


def test_sharded_weights_are_refused(timm_resnet, tmp_path):
    folder = copy_of(timm_resnet, tmp_path)
    (folder / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ZooFolderError, match="sharded weights"):
        read_model(folder)


def test_nothing_is_served_half_configured(timm_resnet, tmp_path):
    """A folder whose weights fail to load leaves no classifier (and no loader workers) behind."""
    import multiprocessing

    folder = copy_of(timm_resnet, tmp_path)
    (folder / "model.safetensors").write_bytes(b"junk")
    before = len(multiprocessing.active_children())
    with pytest.raises(ZooFolderError):
        ImageClassifier.load(folder, device="cpu")
    assert len(multiprocessing.active_children()) <= before


def test_a_classifier_timm_would_drop_is_refused(timm_resnet, tmp_path):
    """model_args building another class count than the weights': timm would load them without
    their classifier (a random head, and only a log line)."""
    folder = copy_of(timm_resnet, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_args"]["num_classes"] = 1000
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ZooFolderError, match=r"model_args\.num_classes 1000 differs from num_classes 10"):
        read_model(folder)


def test_label_names_with_gaps_are_refused(timm_resnet, tmp_path):
    folder = copy_of(timm_resnet, tmp_path)
    edit_json(folder / "config.json", label_names={str(i): f"l{i}" for i in (*range(9), 12)})
    with pytest.raises(ZooFolderError, match=r"label_names must name classes 0\.\.9 without gaps"):
        read_model(folder)


def test_a_model_directory_with_an_unrelated_config_json_is_still_a_model_directory(tmp_path):
    from helpers import demo_model_dir

    folder = demo_model_dir(tmp_path / "demo")
    for content in ('{"model_type": "something else"}', "[1, 2]"):
        (folder / "config.json").write_text(content)
        spec = read_model(folder)
        assert spec.config.arch == "shapes_cnn" and spec.labels == ["circle", "square", "triangle"]


def test_a_timm_config_whose_pretrained_cfg_is_not_an_object(timm_resnet, tmp_path):
    folder = copy_of(timm_resnet, tmp_path)
    edit_json(folder / "config.json", pretrained_cfg=[])
    with pytest.raises(ZooFolderError, match=r"config\.json is not a timm model config"):
        read_model(folder)


@pytest.mark.parametrize(("processor", "message"), [
    pytest.param({"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 200},
                  "crop_size": {"height": 224, "width": 224}}, r"crop_size 224 above shortest_edge 200 pads",
                 id="crop-above-edge"),
    pytest.param({"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 224},
                  "do_center_crop": True, "crop_size": {"height": 200, "width": 200}},
                 r"do_center_crop with crop_size 200 after ConvNeXt's own 224 crop", id="convnext-second-crop"),
    pytest.param({"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 224},
                  "crop_pct": 1.2}, r"crop_pct must be a number in \(0, 1\], got 1\.2", id="convnext-crop-pct"),
    pytest.param({"image_processor_type": "ViTImageProcessor", "image_mean": None},
                 r"image_mean must be a number or 3 numbers", id="mean-null"),
    pytest.param({"image_processor_type": "ViTImageProcessor", "rescale_factor": 0},
                 r"rescale_factor must be a number above 0, got 0", id="rescale-zero"),
])
def test_a_processor_field_value_is_named(hf_vit, tmp_path, processor, message):
    folder = copy_of(hf_vit, tmp_path)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    with pytest.raises(ZooFolderError, match=message):
        read_model(folder)


def test_a_multi_label_model_is_refused(hf_vit, tmp_path):
    folder = copy_of(hf_vit, tmp_path)
    edit_json(folder / "config.json", problem_type="multi_label_classification")
    with pytest.raises(ZooFolderError, match="multi_label_classification is not served"):
        read_model(folder)


def test_a_setting_that_does_not_fit_the_folders_preprocessing_names_the_folder(timm_resnet):
    with pytest.raises(ZooFolderError, match=r"resnet18-a1: handler\.resize_size \(200\) must be >= image_size"):
        read_model(timm_resnet, {"resize_size": 200})
