"""Matting engine: models behind one Protocol, run by onnxruntime / LiteRT / torch / TensorFlow."""
