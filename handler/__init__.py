"""Batched image classification handler for TorchServe.

Modules, one concern each:
    config        -- HandlerConfig, validated once from model-config.yaml's ``handler:`` section
    errors        -- request/image errors that carry their HTTP status
    decode        -- TorchServe request rows -> raw image bytes (raw body, multipart form or
                     multipart/mixed body, JSON base64, KServe)
    images        -- image bytes -> uint8 CHW tensor (decode, EXIF, RGB, resize/crop)
    dataset       -- the torch Dataset the DataLoader workers run ``images`` in
    loader        -- the persistent multi-worker DataLoader, reset per request batch
    inbox         -- shared-memory arena the image bytes travel to the workers in
    staging       -- shared-memory slots the workers write batches into (pinned on CUDA)
    gpu_decode    -- optional batched nvJPEG decode and resize on the GPU
    assemble      -- decoded chunks gathered into full model batches on the device
    batching      -- flatten the server-side batch into image slots and split results back
    architectures -- the demo model (ShapesNet) and the architecture registry
    model_loading -- build an architecture and load its weights and labels
    normalize     -- uint8 batch -> normalized float model input on the device
    optimize      -- inference-only rewrites: BatchNorm folding, optional torch.compile
    memory        -- allocator settings: freed memory kept for the next batch (glibc)
    postprocess   -- logits -> top-k {label: score}
    responses     -- success bodies: plain JSON or the KServe v1/v2 envelope
    metrics       -- per-stage timings and counts for TorchServe's metrics (Prometheus)
    service       -- the one TorchServe handler class that wires the above together
"""
