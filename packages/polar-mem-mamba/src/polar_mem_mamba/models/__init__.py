"""Full models: ``HybridMambaEncoderDecoder`` (all five architectures of the study)."""

from polar_mem_mamba.models.encoder_decoder import Decoder, Encoder, HybridMambaEncoderDecoder

__all__ = ["Decoder", "Encoder", "HybridMambaEncoderDecoder"]
