"""EXIF orientation inside a TensorFlow graph, so that the SavedModel sees a photo as OpenCV does.

The one rule of the repository (docs/data.md, "Which pixels"): a photo is used as a viewer shows
it, its EXIF orientation applied, except where an annotation gives the picture's size and the
stored pixels have that size (COCO's ``width``/``height`` refer to the stored pixels): there the
stored pixels, which the annotation's coordinates refer to (``dataset.pipeline.read_image``).

OpenCV's ``imread``/``imdecode`` apply the orientation; ``tf.io.decode_jpeg`` ignores it. A
portrait phone photo (orientation 6) would be 100x60 in one and 60x100 in the other, and the
served model would return other poses than ``tools/spm_model_test.py`` for the same file.
:func:`decode_photo` decodes as OpenCV does: the orientation tag of the JPEG's APP1 Exif block
read with string ops (TensorFlow has no EXIF reader), then the same flip or rotation.
"""

from __future__ import annotations

import tensorflow as tf

ORIENTATION_TAG = 0x0112
MAX_IFD_ENTRIES = 64        # IFD0 entries looked at (cameras write about a dozen)
_PAD = 16 + 12 * MAX_IFD_ENTRIES


def _reader(data):
    """Byte reader of ``data`` that never reads out of range (zeros past the end)."""
    padded = tf.strings.join([data, tf.constant(b"\0" * _PAD)])
    n = tf.strings.length(data)

    def raw(pos, length: int):
        pos = tf.clip_by_value(pos, 0, n)
        return tf.cast(tf.io.decode_raw(tf.strings.substr(padded, pos, length), tf.uint8), tf.int32)

    def u16(pos, little):
        b = raw(pos, 2)
        return tf.where(little, b[0] + 256 * b[1], 256 * b[0] + b[1])

    def u32(pos, little):
        b = raw(pos, 4)
        return tf.where(little, b[0] + 256 * (b[1] + 256 * (b[2] + 256 * b[3])),
                        b[3] + 256 * (b[2] + 256 * (b[1] + 256 * b[0])))

    return n, padded, raw, u16, u32


def exif_orientation(data) -> tf.Tensor:
    """int32 EXIF orientation (1..8) of encoded image bytes; 1 when there is none (PNG, a JPEG
    without Exif, an unreadable block)."""
    n, padded, raw, u16, u32 = _reader(data)
    is_jpeg = tf.io.is_jpeg(data)

    def tiff_orientation(tiff):
        little = tf.equal(tf.strings.substr(padded, tiff, 2), b"II")
        ifd = tiff + u32(tiff + 4, little)
        count = tf.minimum(u16(ifd, little), MAX_IFD_ENTRIES)
        entries = tf.reshape(raw(ifd + 2, 12 * MAX_IFD_ENTRIES), [MAX_IFD_ENTRIES, 12])
        tags = tf.where(little, entries[:, 0] + 256 * entries[:, 1], 256 * entries[:, 0] + entries[:, 1])
        values = tf.where(little, entries[:, 8] + 256 * entries[:, 9], 256 * entries[:, 8] + entries[:, 9])
        hit = tf.logical_and(tf.equal(tags, ORIENTATION_TAG), tf.range(MAX_IFD_ENTRIES) < count)
        value = tf.reduce_max(tf.where(hit, values, 0))
        return tf.where(tf.logical_and(value >= 1, value <= 8), value, 1)

    # Walk the JPEG's marker segments from after SOI until APP1 "Exif" or the start of the scan.
    def cond(pos, done, orientation):
        return tf.logical_and(tf.logical_not(done), pos + 4 <= n)

    def body(pos, done, orientation):
        marker = raw(pos, 2)
        length = u16(pos + 2, tf.constant(False))
        bad = tf.logical_or(tf.not_equal(marker[0], 0xFF),
                            tf.logical_or(tf.equal(marker[1], 0xDA), tf.equal(marker[1], 0xD9)))
        exif = tf.logical_and(tf.equal(marker[1], 0xE1),
                              tf.equal(tf.strings.substr(padded, pos + 4, 6), b"Exif\0\0"))
        found = tf.logical_and(tf.logical_not(bad), exif)
        orientation = tf.where(found, tiff_orientation(pos + 10), orientation)
        done = tf.logical_or(bad, tf.logical_or(found, length < 2))
        return pos + 2 + length, done, orientation

    _, _, orientation = tf.while_loop(cond, body, [tf.constant(2), tf.logical_not(is_jpeg), tf.constant(1)])
    return orientation


def apply_orientation(image, orientation) -> tf.Tensor:
    """``image`` [h, w, C] as a viewer shows it for EXIF ``orientation`` (OpenCV's transforms)."""
    def mirrored(x):
        return tf.reverse(x, axis=[1])

    branches = [
        lambda: image,                                       # 1 as stored
        lambda: mirrored(image),                             # 2 mirrored
        lambda: tf.image.rot90(image, k=2),                  # 3 upside down
        lambda: tf.reverse(image, axis=[0]),                 # 4 mirrored upside down
        lambda: tf.transpose(image, [1, 0, 2]),              # 5 transposed
        lambda: tf.image.rot90(image, k=3),                  # 6 turned 90 degrees clockwise
        lambda: tf.image.rot90(tf.transpose(image, [1, 0, 2]), k=2),   # 7 transverse
        lambda: tf.image.rot90(image, k=1),                  # 8 turned 90 degrees anticlockwise
    ]
    return tf.switch_case(tf.clip_by_value(orientation, 1, 8) - 1, branches)


def decode_photo(data) -> tf.Tensor:
    """uint8 RGB [h, w, 3] of encoded JPEG or PNG bytes as OpenCV's ``imdecode`` gives it: JPEG
    with libjpeg's accurate integer IDCT (TF's default fast IDCT differs by up to 8 grey levels)
    and its EXIF orientation applied; other formats losslessly."""
    return tf.cond(
        tf.io.is_jpeg(data),
        lambda: apply_orientation(tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
                                  exif_orientation(data)),
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False))
