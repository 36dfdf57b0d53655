"""Models: backbones cut into stages (backbones, efficientnet_lite), BatchNorm folding and AdaBN
(batchnorm), and the model folder a training writes and predict/evaluate read (io)."""
