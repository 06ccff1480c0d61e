"""Batched image classification: a core library, and the servers' doors over it.

The core (no server imported anywhere in it):
    classifier    -- ImageClassifier: load / for_serving / classify / classify_requests / close
    model_files   -- read_model: a model directory, a timm or transformers model folder, or a .mar
                     -> ModelSpec (config, labels, weights)
    zoo           -- timm and transformers model folders: their evaluation preprocessing as
                     handler settings, their labels, the model built by its own library
    process       -- configure_process: allocator, Pillow's pixel limit, torch threads (applied
                     by ImageClassifier.for_serving, the start-up every door shares)
    config        -- HandlerConfig, validated once from model-config.yaml's ``handler:`` section
    errors        -- ImageError / RequestError, and failure codes -> HTTP statuses
    inputs        -- what counts as an image (bytes, paths, PIL images, tensors)
    pipeline      -- Pipeline.run: loader items -> predictions and failures by key, in one call
    loader        -- the persistent multi-worker DataLoader, reset per batch of requests
    supervisor    -- the torch-private DataLoader internals: worker liveness, restart, stop
    dataset       -- the torch Dataset the loader workers run ``images`` in, and its collate
    shared_memory -- the image inbox (bytes out) and pixel ring (pixels back) the loader and its
                     workers share, over one shared-memory helper
    images        -- image bytes -> uint8 CHW tensor (decode, EXIF, RGB, resize/crop)
    gpu_decode    -- optional batched nvJPEG decode and resize on the GPU
    jpeg_header   -- JPEG header marker walk (size, components, EXIF orientation)
    assemble      -- DeviceBatches: decoded chunks -> full, normalized model batches on the device
    normalize     -- uint8 batch -> normalized float model input on the device
    devices       -- device choice, copy-done events, autocast dtype, thread budget
    architectures -- the demo model (ShapesNet), EfficientNet-Lite0 and the architecture registry
    model_loading -- build an architecture and load its weights and labels
    optimize      -- inference-only rewrites: BatchNorm folding, optional torch.compile (frozen
                     for bf16 and int8)
    precision     -- which precision runs here (bf16 on CPUs with bf16 matrix units), and the
                     accuracy measure and gates archive builds apply
    quantize      -- int8: PT2E calibration into a saved program, and loading it
    memory        -- allocator settings: freed memory kept for the next batch (glibc)
    postprocess   -- logits -> top-k {label: score}
    metrics       -- per-stage timings (CUDA events on a GPU)
    protocols     -- wire formats, one module each, parse and encode together (raw, multipart,
                     json_images, kserve_v1, kserve_v2), and decode_request: the one request
                     decoder every door calls

Doors (each maps its server to the core, nothing more):
    service         -- the one TorchServe handler class: context <-> core
    torchserve_io   -- TorchServe's request rows, statuses, response headers and metrics
    kserve_server   -- the KServe model server door (python -m handler.kserve_server)
    batcher         -- batching of concurrent requests, counted in images (KServe and Ray Serve doors)
    ray_serve       -- the Ray Serve door (serve run handler.ray_serve:app model=...)
    ray_data        -- offline classification of a dataset on a Ray cluster (Ray Data actors)
"""
