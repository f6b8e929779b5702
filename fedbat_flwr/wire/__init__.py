"""Wire room: payload layouts, codecs and their validation. numpy only (no torch, no flwr)."""

from fedbat_flwr.wire.codecs import Decoded, decode_payload, payload_kinds, register_codec
from fedbat_flwr.wire.errors import PayloadError
from fedbat_flwr.wire.signs import (
    SIGNS_CODEC_ID,
    SIGNS_VERSION,
    SignsPayload,
    accumulate_signs,
    decode_signs,
    encode_signs,
    payload_nbytes,
    sign_bits_from_payload,
    validate_signs,
)
from fedbat_flwr.wire.spec import AlphaBounds, ModelSpec, TensorSpec

__all__ = [
    "SIGNS_CODEC_ID",
    "SIGNS_VERSION",
    "AlphaBounds",
    "Decoded",
    "ModelSpec",
    "PayloadError",
    "SignsPayload",
    "TensorSpec",
    "accumulate_signs",
    "decode_payload",
    "decode_signs",
    "encode_signs",
    "payload_kinds",
    "payload_nbytes",
    "register_codec",
    "sign_bits_from_payload",
    "validate_signs",
]
