"""Convert an official HRNet checkpoint into this project's trunk weight file.

    python3 tools/convert_hrnet_weights.py --input pose_hrnet_w32_256x192.pth \\
        --output hrnet_w32_pose.weights.h5 --arch hrnet_w32 --source pose
    python3 tools/convert_hrnet_weights.py --input hrnetv2_w32_imagenet_pretrained.pth \\
        --output hrnet_w32_imagenet_ms.weights.h5 --arch hrnet_w32 --source imagenet --multi-scale

``--source pose``: deep-high-resolution-net.pytorch pose model (``final_layer`` ignored).
``--source imagenet``: HRNet-Image-Classification model (classification head ignored).
``--multi-scale``: for the trunk of the ``hrnetv2`` head (all four branches out of the last
module); needs an ImageNet checkpoint. Reads ``.pth`` with PyTorch when it is installed, or a
state_dict saved with NumPy as ``.npz``. Use the result with ``--backbone-weights FILE``.
The key mapping and what is ignored are documented in ``nets/weights.py``.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config.config import ModelConfig  # noqa: E402
from nets.hrnet import OFFICIAL_WIDTHS, backbone_spec  # noqa: E402
from nets.weights import IGNORABLE_HEADS, convert_checkpoint  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--input", required=True, help="official checkpoint, .pth or .npz")
    parser.add_argument("--output", required=True, help="trunk weights to write, *.weights.h5")
    parser.add_argument("--arch", required=True, choices=sorted(OFFICIAL_WIDTHS) + ["hrnet_tiny"],
                        help="trunk architecture (hrnet_tiny uses the default tiny_* config)")
    parser.add_argument("--source", default="pose", choices=sorted(IGNORABLE_HEADS),
                        help="which official repository the checkpoint comes from")
    parser.add_argument("--multi-scale", action="store_true",
                        help="convert for the multi-scale trunk of the hrnetv2 head")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = convert_checkpoint(args.input, args.output,
                                    backbone_spec(ModelConfig(backbone=args.arch)),
                                    source=args.source, multi_scale_output=args.multi_scale)
    except (ValueError, FileNotFoundError) as e:
        print(f"convert_hrnet_weights: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: {result['loaded']} tensors, {len(result['ignored'])} "
          f"ignored keys of the official heads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
