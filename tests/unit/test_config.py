import pytest

from handler.config import HandlerConfig


def test_defaults_are_valid():
    config = HandlerConfig.from_mapping(None)
    assert config.image_size == 224 and config.resize_mode == "center_crop"


def test_values_are_converted():
    config = HandlerConfig.from_mapping({"mean": [0, 0.5, 1], "top_k": 2})
    assert config.mean == (0.0, 0.5, 1.0) and config.top_k == 2


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="'batchsize'"):
        HandlerConfig.from_mapping({"batchsize": 8})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        pytest.param({"top_k": "5"}, "top_k must be an integer", id="string-for-int"),
        pytest.param({"pin_memory": 1}, "pin_memory must be true or false", id="int-for-bool"),
        pytest.param({"num_workers": True}, "num_workers must be an integer", id="bool-for-int"),
        pytest.param({"mean": [0.5, 0.5]}, "mean must be a list of 3 numbers", id="short-mean"),
        pytest.param({"batch_size": 0}, "batch_size must be > 0", id="zero-batch"),
        pytest.param({"num_workers": -1}, "num_workers must be >= 0", id="negative-workers"),
        pytest.param({"resize_mode": "crop"}, "resize_mode must be one of", id="bad-mode"),
        pytest.param({"resize_size": 100}, "resize_size .100. must be >= image_size", id="resize-below-crop"),
        pytest.param({"std": [1, 0, 1]}, "std values must be > 0", id="zero-std"),
        pytest.param({"mp_context": "threads"}, "mp_context must be one of", id="bad-mp-context"),
        pytest.param({"pad_value": 300}, "pad_value must be within", id="pad-out-of-range"),
        pytest.param({"pad_value": [1, 2, 300]}, "pad_value must be within", id="pad-channel-out-of-range"),
        pytest.param({"pad_value": [1, 2]}, "pad_value must be an integer or a list of 3", id="pad-two-values"),
        pytest.param({"crop_offset": "ceil"}, "crop_offset must be one of round, floor", id="bad-crop-offset"),
        pytest.param({"resize_mode": "squash_center_crop", "resize_size": 200},
                     "resize_size .200. must be >= image_size .224. in resize_mode squash_center_crop",
                     id="squash-crop-below-crop"),
        pytest.param({"use_test_size": "yes"}, "use_test_size must be true or false", id="test-size-string"),
    ],
)
def test_invalid_values_are_rejected_with_the_key(settings, message):
    with pytest.raises(ValueError, match=message):
        HandlerConfig.from_mapping(settings)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        pytest.param({"cudnn_benchmark": True}, "needs handler.batch_buckets", id="benchmark-without-buckets"),
        pytest.param({"batch_buckets": [8, 4, 16]}, "increasing positive", id="unsorted-buckets"),
        pytest.param({"batch_buckets": [2, 4]}, "size >= batch_size", id="buckets-below-batch"),
        pytest.param({"batch_buckets": [4, "8"]}, "list of integers", id="string-bucket"),
        pytest.param({"precision": "int4"}, "precision must be one of", id="bad-precision"),
        pytest.param({"compile": "sometimes"}, "compile must be true, false or auto", id="compile-sometimes"),
        pytest.param({"compile": 1}, "compile must be true, false or auto", id="compile-number"),
        pytest.param({"compile_budget_s": 0}, "compile_budget_s must be > 0", id="no-compile-budget"),
        pytest.param({"compile_mode": "fast"}, "compile_mode must be one of", id="bad-compile-mode"),
        pytest.param({"jpeg_draft_margin": 0.5}, "jpeg_draft_margin must be >= 1", id="draft-margin-below-1"),
        pytest.param({"jpeg_draft_margin": "2"}, "jpeg_draft_margin must be a number", id="draft-margin-string"),
        pytest.param({"cpu_decode_share": 1.5}, "cpu_decode_share must be between 0 and 1", id="share-above-1"),
        pytest.param({"loader_batch_size": -1}, "loader_batch_size must be >= 0", id="negative-loader-batch"),
    ],
)
def test_fast_path_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        HandlerConfig.from_mapping(settings)


def test_buckets_and_benchmark_together_are_valid():
    config = HandlerConfig.from_mapping({"batch_buckets": [1, 4, 32], "cudnn_benchmark": True, "precision": "bf16"})
    assert config.batch_buckets == (1, 4, 32)


def test_loader_chunks_default_to_the_model_batch():
    assert HandlerConfig(batch_size=64).loader_chunk == 64
    assert HandlerConfig(batch_size=64, loader_batch_size=16).loader_chunk == 16


def test_compiling_is_the_default_with_buckets_derived_from_the_batch_size():
    assert HandlerConfig().compile == "auto"
    assert HandlerConfig.from_mapping({"compile": True}).compile is True  # no buckets needed any more
    assert HandlerConfig(batch_size=16).compile_buckets == (1, 2, 4, 8, 16)
    assert HandlerConfig(batch_size=24).compile_buckets == (1, 2, 4, 8, 16, 24)
    assert HandlerConfig(batch_size=1).compile_buckets == (1,)
    assert HandlerConfig(batch_size=16, batch_buckets=(4, 16)).compile_buckets == (4, 16)


def test_pad_value_takes_one_value_or_one_per_channel():
    assert HandlerConfig.from_mapping({"pad_value": 7}).pad_rgb == (7, 7, 7)
    assert HandlerConfig.from_mapping({"pad_value": [124, 116, 104]}).pad_rgb == (124, 116, 104)


def test_use_test_size_is_refused_for_models_that_are_not_timm_folders():
    from pathlib import Path

    from handler.model.files import read_model

    with pytest.raises(ValueError, match="use_test_size applies to timm model folders only"):
        read_model(Path(__file__).resolve().parents[2] / "models" / "shapes", {"use_test_size": True})
