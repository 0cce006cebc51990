"""Files and text: model sources, one safetensors reader, text and calibration windows."""
