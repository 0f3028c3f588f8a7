"""Patch-based CNN inference (MCUNetV2): models, receptive-field arithmetic, executors, memory planner,
receptive-field redistribution and int8 post-training quantization."""
