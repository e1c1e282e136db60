"""clipdex command line: thin click wrappers that build inputs, call the packages, print results.

Only this module exits the process; library code raises ClipdexError subclasses, printed here as
one line each.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

import click

from store.errors import ClipdexError, InputError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def model_options(command: Callable) -> Callable:
    """--model/--pretrained/--device, shared by every command that embeds."""
    from indexer.models import DEFAULT_MODEL

    options = [
        click.option("--model", "model_name", default=DEFAULT_MODEL, envvar="CLIPDEX_MODEL", show_default=True,
                     help="open_clip model name (see `clipdex models`), or the bundled demo model 'clipdex-shapes'. "
                          "Env: CLIPDEX_MODEL."),
        click.option("--pretrained", default=None, envvar="CLIPDEX_PRETRAINED",
                     help="Pretrained tag (e.g. laion2b_s34b_b79k, downloaded once) or a local checkpoint file. "
                          "Default: the model's default tag (laion2b_s34b_b79k for ViT-B-32); the bundled "
                          "weights for clipdex-shapes. Env: CLIPDEX_PRETRAINED."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _load_images(paths: Sequence[str]):
    from indexer.images import load_image

    if not paths:
        raise InputError("give at least one image file")
    return [load_image(path) for path in paths]


def _names(paths: Sequence[str]) -> list[str]:
    """Short, unique column names: file names, or the paths as given where names clash."""
    names = [Path(p).name for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="clipdex")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """clipdex: embed image collections with open_clip and search them offline.

    Start with `clipdex demo`, which runs everything on the bundled demo model without a network.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@cli.command("models", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
def models_command(as_json: bool) -> None:
    """List the models and pretrained tags clipdex can load (bundled ones first)."""
    from indexer.models import list_models

    infos = list_models()
    if as_json:
        click.echo(json.dumps([{"name": i.name, "pretrained": list(i.tags), "bundled": i.bundled} for i in infos]))
        return
    width = max(len(i.name) for i in infos)
    for info in infos:
        tags = ", ".join(info.tags) or "(no published weights: pass --pretrained FILE)"
        suffix = f"  -- {info.description}" if info.description else ""
        click.echo(f"{info.name:<{width}}  {tags}{suffix}")


@cli.command("compare", context_settings=CONTEXT)
@click.argument("images", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--text", "-t", "texts", multiple=True, required=True, help="A text to compare (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print {texts, images, similarity} as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Also draw the similarity heatmap into this PNG.")
@model_options
def compare_command(images, texts, as_json, plot, model_name, pretrained, device) -> None:
    """Cosine similarity of every text with every image (rows texts, columns images).

    \b
    Example:
      clipdex compare a.jpg b.png --text "a dog" --text "a cat" --model clipdex-shapes
    """
    from indexer.models import load_model
    from search.zeroshot import similarity

    if not [t for t in texts if t.strip()]:
        raise InputError("--text is empty: give a text to compare")
    pictures = _load_images(images)
    sims = similarity(load_model(model_name, pretrained, device), pictures, texts)
    names = _names(images)
    if as_json:
        click.echo(json.dumps({"texts": list(texts), "images": list(images),
                               "similarity": [[round(float(v), 6) for v in row] for row in sims]}))
    else:
        _print_matrix(sims, texts, names)
    if plot:
        from search.plots import plot_similarity

        click.echo(f"plot written to {plot_similarity(sims, pictures, texts, plot)}", err=True)


def _print_matrix(sims, rows: Sequence[str], columns: Sequence[str]) -> None:
    row_width = min(max(len(r) for r in rows), 50)
    col_width = max(8, *(len(c) for c in columns))
    click.echo(" " * row_width + "".join(f"  {c:>{col_width}}" for c in columns))
    for label, values in zip(rows, sims):
        click.echo(f"{label[:row_width]:<{row_width}}" + "".join(f"  {v:>{col_width}.3f}" for v in values))


@cli.command("classify", context_settings=CONTEXT)
@click.argument("images", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--labels", help="Comma-separated labels, or the name of a built-in set: cifar100.")
@click.option("--labels-file", type=click.Path(dir_okay=False), help="A file with one label per line.")
@click.option("--template", default="a photo of a {}", show_default=True, help="Prompt; '{}' is replaced by the label.")
@click.option("-k", "--top-k", "k", default=5, show_default=True, type=int, help="How many labels to show per image.")
@click.option("--json", "as_json", is_flag=True, help='Print [{"path", "top": [{"label", "prob"}]}] as JSON.')
@click.option("--plot", type=click.Path(dir_okay=False), help="Also draw each image beside its top-k bar chart.")
@model_options
def classify_command(images, labels, labels_file, template, k, as_json, plot, model_name, pretrained, device) -> None:
    """Zero-shot classification: top-k labels per image, probabilities = softmax(100 * cosine).

    \b
    Example:
      clipdex classify photo.jpg --labels cifar100
      clipdex classify a.png --labels circle,square,triangle,star --model clipdex-shapes
    """
    from indexer.models import load_model
    from search.zeroshot import check_template, classify, clean_labels

    label_list = clean_labels(_read_labels(labels, labels_file))
    check_template(template)
    if k < 1:
        raise InputError(f"-k must be at least 1, got {k}")
    pictures = _load_images(images)
    results = classify(load_model(model_name, pretrained, device), pictures, label_list, template, k)
    if as_json:
        click.echo(json.dumps([{"path": path, "top": [{"label": s.label, "prob": round(s.prob, 6)} for s in top]}
                               for path, top in zip(images, results)]))
    else:
        for path, top in zip(images, results):
            click.echo(path)
            for score in top:
                click.echo(f"  {score.prob:7.2%}  {score.label}")
    if plot:
        from search.plots import plot_classification

        click.echo(f"plot written to {plot_classification(pictures, results, _names(images), plot)}", err=True)


def _read_labels(labels: str | None, labels_file: str | None) -> list[str]:
    from search.labelsets import get_label_set

    if bool(labels) == bool(labels_file):
        raise InputError("give exactly one of --labels a,b,c (or --labels cifar100) and --labels-file FILE")
    if labels_file:
        try:
            return Path(labels_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"cannot read labels file {labels_file}: {error}") from error
    return list(get_label_set(labels) or labels.split(","))


@cli.command("demo-data", context_settings=CONTEXT)
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--count", "-n", default=300, show_default=True, type=click.IntRange(min=1), help="Number of images.")
@click.option("--seed", default=7, show_default=True, type=int,
              help="Library seed; the bundled model was trained on seed 0, so other seeds are unseen data.")
def demo_data_command(directory: str, count: int, seed: int) -> None:
    """Generate a synthetic photo library of coloured shapes (JPEG and PNG) plus labels.csv."""
    labels = _write_demo_library(Path(directory), count, seed)
    click.echo(f"wrote {count} images and {labels}")


def _write_demo_library(directory: Path, count: int, seed: int) -> Path:
    from tqdm import tqdm

    from indexer.shapes import write_library

    if directory.exists() and any(directory.iterdir()):
        raise InputError(f"{directory} is not empty: choose a new directory so nothing in it is overwritten")
    with tqdm(total=count, desc="generating", unit="img", file=sys.stderr, disable=None) as bar:
        return write_library(directory, count, seed, progress=bar.update)


@cli.command("demo", context_settings=CONTEXT)
@click.option("--dir", "directory", default="clipdex-demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the demo library and plots go (reused when it already holds a demo library).")
@click.option("--count", "-n", default=300, show_default=True, type=click.IntRange(min=20), help="Library size.")
def demo_command(directory: str, count: int) -> None:
    """Run clipdex end to end, offline, on the bundled clipdex-shapes model and a generated library."""
    from search.demo import demo_lines

    for line in demo_lines(Path(directory), count, _write_demo_library):
        click.echo(line)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: one line per error, exit codes 0 ok, 1 failed, 2 usage, 130 interrupted."""
    try:
        code = cli.main(args=argv, prog_name="clipdex", standalone_mode=False)
    except click.UsageError as error:
        hint = f" (see '{error.ctx.command_path} --help')" if error.ctx else ""
        click.echo(f"error: {error.format_message()}{hint}", err=True)
        sys.exit(error.exit_code)
    except click.ClickException as error:
        click.echo(f"error: {error.format_message()}", err=True)
        sys.exit(error.exit_code)
    except ClipdexError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    except (click.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
