"""Batched image classification: a core library, and the servers' doors over it.

The floors, top to bottom; a module imports only from its own floor or below (the import
contract in pyproject.toml, checked by ``lint-imports`` in the test command); no server library
(TorchServe, KServe, Ray, FastAPI) is imported below ``doors``:

    doors/        each adapts one server's transport to the serving loop, nothing more
        torchserve_handler  the one class TorchServe loads (initialize / handle)
        torchserve_io       TorchServe's request rows, statuses, headers and metrics cache
        kserve_door         KServe's model server (python -m handler.doors.kserve_door)
        ray_serve           Ray Serve (serve run handler.doors.ray_serve:app model=...)
        ray_data            offline classification on a Ray cluster (Ray Data actors)
    serving       the serving loop every door calls: parse -> classify (batched by image
                  count) -> encode -> reply or error -> telemetry; health
    batcher       concurrent requests gathered into batches counted in images
    evaluate      the accuracy gate: top-1 on labelled images, fp32 against each candidate
                  (precision x runtime) as served -> a GateRecord
    classifier    ImageClassifier: load / for_serving / classify / classify_requests / healthy
    protocols/    wire formats, one module each, parse and encode together (raw, multipart,
                  json_images, kserve_v1, kserve_v2), and parse_request, the one decoder
    pipeline      Pipeline.start (the factory) and Pipeline.run: items -> predictions by key
    decode/       image bytes -> normalized model batches on the device
        path          DecodePath: chunks() and batches(), the iterables the pipeline consumes
        loader        the persistent multi-worker DataLoader; supervisor: its worker liveness
        dataset       the Dataset the workers run; items: what travels (LoaderItem, DecodedBatch)
        shared_memory the image inbox (bytes out) and pixel ring (pixels back)
        images        decode, EXIF, RGB, resize / crop; jpeg_header: the header walk
        gpu           nvJPEG lists decoded and resized on the GPU
        assemble      DeviceBatches: chunks -> full model batches on the device
        normalize     uint8 -> normalized float on the device; inputs: what counts as an image
    model/        a model's files to a prepared model and its forward pass
        files         read_model: a model directory, a zoo folder or a .mar -> ModelSpec
        zoo/          timm and transformers folders: preprocessing, labels, loaders
        loading       architectures built and weights loaded; architectures: our own models
        optimize      BatchNorm folding, torch.compile; precision: what auto resolves to (CPU
                      features, the gate record); quantize: int8 (PT2E)
        ov_runtime    OpenVINO: the runtime choice, conversion cached by the weights' hash, int8 (NNCF)
        records       gate records tied to the weights' SHA-256, and the artifacts they vouch for
        runner        ModelRunner: runtime, precision and their fallbacks, prepare, compile, forward
        topk          logits -> top-k {label: score}
    config, errors, devices, process, memory, metrics, telemetry
                  the ground floor: settings, failure types and statuses, device choice,
                  process-wide settings, the allocator, stage timings, metric definitions
"""
