"""What kind of JPEG a byte string holds, read from its header alone: which ones the device decoder takes.

torchvision's GPU decoder (nvJPEG, `decode_jpegs_cuda`) refuses what `nvjpegGetImageInfo` cannot read and any chroma
subsampling it reports as unknown, and converts every 3-component image from YCbCr. So a JPEG goes to the device only
when it is a Huffman-coded baseline, extended or progressive frame (SOF0/1/2: no arithmetic coding, lossless or
hierarchical frames) of 8-bit samples, with 1 component (grey) or 3 components in one of nvJPEG's subsamplings, and no
Adobe APP14 marker saying its 3 components are RGB rather than YCbCr. Everything else — CMYK and YCCK (4 components,
Adobe transform 0 or 2), 12-bit, arithmetic-coded, odd subsamplings — is decoded on the CPU in the worker.
"""
from dataclasses import dataclass

SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG and DAC share the range
DEVICE_SOF = (0xC0, 0xC1, 0xC2)  # Huffman baseline, extended sequential, progressive
STANDALONE = set(range(0xD0, 0xD8)) | {0x01}  # RSTn and TEM carry no length
START_OF_SCAN, APP14 = 0xDA, 0xEE
# (h, v) sampling of the luma component with both chroma components at (1, 1): 4:4:4, 4:2:2, 4:4:0, 4:2:0, 4:1:1, 4:1:0
DEVICE_LUMA_SAMPLING = {(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (4, 2)}


@dataclass(frozen=True)
class JpegFrame:
    marker: int                 # the SOF marker's second byte (0xC0 baseline, 0xC2 progressive, ...)
    precision: int              # bits per sample
    height: int
    width: int
    sampling: tuple             # (h, v) per component
    adobe_transform: int | None  # APP14 "Adobe" colour transform: 0 none (RGB/CMYK), 1 YCbCr, 2 YCCK


def read_frame(data: bytes) -> JpegFrame | None:
    """The frame header of a JPEG (markers up to the first SOF), or None where the bytes are not a readable one."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, adobe = 2, None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in STANDALONE:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        payload = data[pos + 4:pos + 2 + length]
        if length < 2 or len(payload) < length - 2 or marker == START_OF_SCAN:
            return None  # truncated, or a scan before any frame header
        if marker == APP14 and payload[:5] == b"Adobe" and len(payload) >= 12:
            adobe = payload[11]
        if marker in SOF_MARKERS:
            return frame_from(marker, payload, adobe)
        pos += 2 + length
    return None


def frame_from(marker: int, payload: bytes, adobe: int | None) -> JpegFrame | None:
    if len(payload) < 6:
        return None
    components = payload[5]
    if len(payload) < 6 + 3 * components:
        return None
    sampling = tuple((payload[7 + 3 * c] >> 4, payload[7 + 3 * c] & 15) for c in range(components))
    return JpegFrame(marker, payload[0], int.from_bytes(payload[1:3], "big"), int.from_bytes(payload[3:5], "big"),
                     sampling, adobe)


def device_decodable(data: bytes) -> bool:
    """Whether torchvision's GPU decoder takes this JPEG and gives its RGB pixels (see the module docstring)."""
    frame = read_frame(data)
    if frame is None or frame.marker not in DEVICE_SOF or frame.precision != 8 or not frame.height * frame.width:
        return False
    if len(frame.sampling) == 1:
        return True
    return (len(frame.sampling) == 3 and frame.adobe_transform != 0 and frame.sampling[1:] == ((1, 1), (1, 1))
            and frame.sampling[0] in DEVICE_LUMA_SAMPLING)
