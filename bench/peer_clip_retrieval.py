"""Peer run: `clip-retrieval inference`, unchanged, in its own virtualenv (timed by the caller).

    clip-retrieval cannot be told about a model config file, so this shim registers
    clipdex-shapes' open_clip config (a JSON file; "-" for none) and hands argv to its CLI.

    /path/to/cr/bin/python bench/peer_clip_retrieval.py CONFIG_JSON -- inference --input_dataset ...
"""

import sys


def main() -> None:
    config, _, *argv = sys.argv[1:]
    import open_clip

    if config != "-":  # "-": a model open_clip already knows
        open_clip.add_model_config(config)
    from clip_retrieval.cli import main as clip_retrieval_main

    sys.argv = ["clip-retrieval", *argv]
    clip_retrieval_main()


if __name__ == "__main__":
    main()
