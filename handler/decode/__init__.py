"""The decode layer: image bytes to normalized model batches on the device (decode, resize, the persistent loader and its shared memory, nvJPEG, device assembly)."""
