"""Smaller checkpoints for pruned models: the sparse format (kept values only), and Deep Compression (Han, Mao &
Dally 2016) after pruning: trained k-means quantization (`quantization`, `callback`), Huffman coding (`huffman`),
the deep file format (`deep_format`) and the Huffman-coded gaps of kept positions it shares with the masks file
(`positions`)."""

from .callback import QuantizationCallback
from .deep_format import (
    DeepCompressionSizes,
    deep_compression_sizes,
    load_deep_compressed,
    read_deep_compressed,
    read_deep_state_dict,
    save_deep_compressed,
)
from .huffman import HuffmanTable, huffman_decode, huffman_encode
from .quantization import (
    QuantizedWeight,
    TrainedQuantizer,
    check_bits,
    dequantize,
    kmeans_1d,
    quantize_weight,
    quantize_weights,
)
from .sparse_format import read_sparse, save_sparse


__all__ = [
    "DeepCompressionSizes",
    "HuffmanTable",
    "QuantizationCallback",
    "QuantizedWeight",
    "TrainedQuantizer",
    "check_bits",
    "deep_compression_sizes",
    "dequantize",
    "huffman_decode",
    "huffman_encode",
    "kmeans_1d",
    "load_deep_compressed",
    "quantize_weight",
    "quantize_weights",
    "read_deep_compressed",
    "read_deep_state_dict",
    "read_sparse",
    "save_deep_compressed",
    "save_sparse",
]
