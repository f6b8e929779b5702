"""Wire room: payload layouts, codecs and their validation. numpy only (no torch, no flwr)."""

from fedbat_flwr.wire import fedbif, fedpm
from fedbat_flwr.wire.binary import (
    BinaryWeightsPayload,
    encode_binary_weights,
    is_binarized,
    validate_binary_weights,
)
from fedbat_flwr.wire.codecs import (
    SIGN_KINDS,
    Decoded,
    decode_payload,
    payload_kinds,
    register_codec,
)
from fedbat_flwr.wire.errors import PayloadError
from fedbat_flwr.wire.kbit import (
    KbitPayload,
    encode_kbit,
    pack_uint,
    quantize_stochastic,
    unpack_uint,
    validate_kbit,
)
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
from fedbat_flwr.wire.sparse import SparsePayload, encode_sparse, validate_sparse
from fedbat_flwr.wire.spec import AlphaBounds, ModelSpec, TensorSpec
from fedbat_flwr.wire.votes import majority_vote

__all__ = [
    "SIGNS_CODEC_ID",
    "SIGNS_VERSION",
    "SIGN_KINDS",
    "AlphaBounds",
    "BinaryWeightsPayload",
    "Decoded",
    "KbitPayload",
    "ModelSpec",
    "PayloadError",
    "SignsPayload",
    "SparsePayload",
    "TensorSpec",
    "accumulate_signs",
    "decode_payload",
    "decode_signs",
    "encode_binary_weights",
    "encode_kbit",
    "encode_signs",
    "encode_sparse",
    "fedbif",
    "fedpm",
    "is_binarized",
    "majority_vote",
    "pack_uint",
    "payload_kinds",
    "payload_nbytes",
    "quantize_stochastic",
    "register_codec",
    "sign_bits_from_payload",
    "unpack_uint",
    "validate_binary_weights",
    "validate_kbit",
    "validate_signs",
    "validate_sparse",
]
