"""Models: the backbone registry, one BackboneSpec per backbone (registry); the staged model and its
FLOP count (staged); weights specs, safe state-dict reading and key renaming (weights); EfficientNet-Lite0
in plain torch (efficientnet_lite); AdaBN (batchnorm); and the model folder a training writes and
predict/evaluate read (io)."""
