"""`mnist-dist predict` on pictures as a user makes them: any size, offset, colour and polarity come
out as the same MNIST-form digit; every bad file gets its own error line while the rest are still
predicted; the files are read in batches. The proof trains real weights and reads real MNIST test
digits drawn large, dark on white and off-centre, saved as PNG and JPEG."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from mnist_dist import predict as P
from mnist_dist.cli import app
from mnist_dist.config import from_preset
from mnist_dist.data import MNISTArrays
from mnist_dist.model import build_model
from mnist_dist.runfiles import WEIGHTS_FILE, write_config
from mnist_dist.weights import save_weights


def light_on_dark(shape: str = "seven") -> Image.Image:
    """A digit-like stroke figure, light on black, the way MNIST stores its digits."""
    image = Image.new("L", (112, 112), 0)
    draw = ImageDraw.Draw(image)
    if shape == "seven":
        draw.line([(20, 20), (90, 20), (45, 95)], fill=255, width=12)
    else:  # a ring
        draw.ellipse([30, 15, 80, 95], outline=255, width=10)
    return image


def as_drawn(digit: Image.Image, scale: float, canvas: tuple[int, int], offset: tuple[int, int],
             ink: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:  # fmt: skip
    """``digit`` (light on dark) as a user would draw it: scaled, in ``ink`` on a white canvas."""
    size = (round(digit.width * scale), round(digit.height * scale))
    strokes = digit.resize(size, Image.Resampling.BICUBIC)
    layer = Image.composite(Image.new("RGB", size, ink), Image.new("RGB", size, "white"), strokes)
    picture = Image.new("RGB", canvas, "white")
    picture.paste(layer, offset)
    return picture


def random_drawing(digit: Image.Image, rng: random.Random) -> Image.Image:
    scale = rng.uniform(0.5, 4)
    width, height = round(digit.width * scale), round(digit.height * scale)
    canvas = (width + rng.randint(10, 300), height + rng.randint(10, 300))
    offset = (rng.randint(0, canvas[0] - width), rng.randint(0, canvas[1] - height))
    ink = rng.choice([(0, 0, 0), (20, 40, 170), (160, 20, 20), (30, 30, 30)])
    return as_drawn(digit, scale, canvas, offset, ink)


def mean_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute pixel difference (0..1) at the best alignment within one pixel: like MNIST, the
    centring moves a digit by whole pixels, so a centre of mass half-way between two pixels may go
    either way."""
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    a, b = a.float() / 255, b.float() / 255
    return min((a.roll(shift, (0, 1)) - b).abs().mean().item() for shift in shifts)


def centre_of_mass(digit: torch.Tensor) -> tuple[float, float]:
    x, index = digit.float(), torch.arange(P.SIDE).float()
    return ((x.sum(1) * index).sum() / x.sum()).item(), ((x.sum(0) * index).sum() / x.sum()).item()


def ink_box(digit: torch.Tensor) -> tuple[int, int]:
    rows, cols = digit.bool().any(1).nonzero()[:, 0], digit.bool().any(0).nonzero()[:, 0]
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


# ---------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("shape", ["seven", "ring"])
@pytest.mark.parametrize("seed", range(6))
def test_a_drawing_comes_out_as_its_light_on_dark_original(shape: str, seed: int) -> None:
    """Any scale, offset, canvas and ink give the original's digit. The fitted box is a whole number of
    pixels (as in MNIST), so a thin stroke's box may come out one pixel narrower: that much differs."""
    original = P.preprocess(light_on_dark(shape))
    drawn = random_drawing(light_on_dark(shape), random.Random(seed))
    for picture in (drawn, drawn.convert("L")):
        digit = P.preprocess(picture)
        assert mean_difference(digit, original) < 0.05
        assert all(abs(m - n) <= 1 for m, n in zip(ink_box(digit), ink_box(original), strict=True))
        assert all(
            abs(m - n) <= 1 for m, n in zip(centre_of_mass(digit), centre_of_mass(original), strict=True)
        )


@pytest.mark.parametrize("box", [(50, 90), (90, 50), (60, 60), (8, 100), (100, 12)])
def test_the_digit_fills_the_20x20_box_aspect_kept_centre_of_mass_at_14(box: tuple[int, int]) -> None:
    width, height = box
    picture = Image.new("L", (width + 170, height + 90), 230)  # grey paper, dark ink, off-centre
    ImageDraw.Draw(picture).ellipse([150, 60, 150 + width - 1, 60 + height - 1], fill=40)
    digit = P.preprocess(picture)
    rows, cols = ink_box(digit)
    assert max(rows, cols) == P.FIT
    assert min(rows, cols) == pytest.approx(P.FIT * min(box) / max(box), abs=1)
    assert (rows > cols) == (height > width) or width == height
    row, col = centre_of_mass(digit)
    assert abs(row - P.CENTRE) <= 1 and abs(col - P.CENTRE) <= 1


@pytest.mark.parametrize("colour", [0, 255], ids=["dark-strokes", "light-strokes"])
def test_strokes_on_a_transparent_background(colour: int) -> None:
    strokes = light_on_dark()
    picture = Image.new("RGBA", strokes.size, (colour, colour, colour, 0))
    picture.putalpha(strokes)
    assert mean_difference(P.preprocess(picture), P.preprocess(strokes)) < 0.01


# ---------------------------------------------------------------------- the command
@pytest.fixture
def weights(tmp_path: Path) -> Path:
    """A run folder of the default preset (its config.json names the model), untrained weights."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = from_preset("default")
    torch.manual_seed(0)
    save_weights(build_model(cfg.model), run / WEIGHTS_FILE)
    write_config(run, cfg)
    return run


def pictures(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(count)
    paths = [folder / f"digit{i}.png" for i in range(count)]
    for path in paths:
        random_drawing(light_on_dark(rng.choice(["seven", "ring"])), rng).save(path)
    return paths


def predict(*args: str | Path) -> object:
    return CliRunner().invoke(app, ["predict", *map(str, args)])


def test_each_bad_file_gets_one_line_and_the_others_are_still_predicted(
    weights: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "mixed"
    good = pictures(folder, 2)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not a picture\n")
    (folder / "cut.png").write_bytes(good[0].read_bytes()[:200])
    Image.new("RGB", (64, 48), (200, 210, 220)).save(folder / "uniform.jpg")
    (tmp_path / "nothing").mkdir()
    (folder / "subfolder").mkdir()
    result = predict(weights, folder, tmp_path / "nothing")
    assert result.exit_code == 1, result.output
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == [str(p) for p in good]
    errors = result.stderr.splitlines()
    expected = {
        "cut.png": "unreadable image", "empty.png": "empty file", "notes.txt": "not an image",
        "uniform.jpg": "no digit found", "nothing": "folder holds no files",
    }  # fmt: skip
    assert len(errors) == len(expected), result.stderr
    for line, (name, says) in zip(errors, expected.items(), strict=True):
        assert line.startswith("Error: ") and name in line and says in line, line
    assert "Traceback" not in result.output


def test_json_gives_file_digit_and_ten_probabilities(weights: Path, tmp_path: Path) -> None:
    paths = pictures(tmp_path / "in", 3)
    result = predict(weights, *paths, "--json")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["file"] for r in records] == [str(p) for p in paths]
    for record in records:
        probabilities = record["probabilities"]
        assert len(probabilities) == 10 and all(isinstance(p, float) for p in probabilities)
        assert sum(probabilities) == pytest.approx(1, abs=1e-5)
        assert record["digit"] == max(range(10), key=probabilities.__getitem__)


def test_plain_output_names_file_digit_confidence_and_top_3(weights: Path, tmp_path: Path) -> None:
    (path,) = pictures(tmp_path / "in", 1)
    result = predict(weights, path)
    line = result.stdout.strip()
    prediction = next(P.predict_files(P.ready_model(weights), [path]))
    assert isinstance(prediction, P.Prediction)
    digits = [d for d, _ in prediction.top()]
    assert line.startswith(f"{path}: {prediction.digit} (") and "top 3: " in line
    assert [int(g.split()[0]) for g in line.split("top 3: ")[1].split(", ")] == digits


def test_save_preprocessed_writes_what_the_model_saw(weights: Path, tmp_path: Path) -> None:
    (path,) = pictures(tmp_path / "in", 1)
    twin = path.with_suffix(".jpg")
    Image.open(path).save(twin, quality=90)
    out = tmp_path / "seen" / "deeper"
    result = predict(weights, path, twin, "--save-preprocessed", out, "--json")
    assert result.exit_code == 0, result.output
    written = [Path(json.loads(line)["preprocessed"]) for line in result.stdout.splitlines()]
    assert written == [out / "digit0.png", out / "digit0-2.png"]
    for source, png in zip([path, twin], written, strict=True):
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size == (28, 28) and image.mode == "L"
            seen = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(28, 28)
        assert torch.equal(seen, P.preprocess(P.read_image(source)))


def test_no_preprocessed_folder_when_no_digit_was_read(weights: Path, tmp_path: Path) -> None:
    (tmp_path / "blank.png").write_bytes(b"")
    result = predict(weights, tmp_path / "blank.png", "--save-preprocessed", tmp_path / "seen")
    assert result.exit_code == 1 and not (tmp_path / "seen").exists()


def test_files_are_read_predicted_and_given_out_batch_by_batch(
    weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = pictures(tmp_path / "in", 5)
    model = P.ready_model(weights)
    whole = [r.probabilities for r in P.predict_files(model, paths)]  # one batch
    monkeypatch.setattr(P, "BATCH", 2)
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda _, args: sizes.append(len(args[0])))
    results = P.predict_files(model, paths)
    first = [next(results), next(results)]
    paths[2].unlink()  # the second batch is read only when its first result is asked for
    rest = list(results)
    assert sizes == [2, 1, 1]
    assert [r.file for r in first + rest] == paths
    assert isinstance(rest[0], P.Failure) and "unreadable" in rest[0].message
    kept = [r.probabilities for r in first + rest[1:]]
    assert torch.allclose(torch.tensor(kept), torch.tensor(whole[:2] + whole[3:]))


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["{w}", "{tmp}/missing.png"], "no such image or folder: {tmp}/missing.png"),
        (["{tmp}/none.safetensors", "{img}"], "{tmp}/none.safetensors does not exist"),
        (["{w}", "{img}", "--model", "big"], "model 'big' is not one of"),
        (["{w}", "{img}", "--save-preprocessed", "{img}"], "is not a writable folder"),
    ],
    ids=["missing-image", "missing-weights", "bad-model", "output-is-a-file"],
)
def test_refusals_exit_2_with_one_line(weights: Path, tmp_path: Path, args: list[str], says: str) -> None:
    (img,) = pictures(tmp_path / "in", 1)
    names = {"w": weights, "tmp": tmp_path, "img": img}
    result = predict(*[a.format(**names) for a in args])
    assert result.exit_code == 2, result.output
    assert says.format(**names) in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


# ---------------------------------------------------------------------- proof
# 400 digits read 0.75 points worse drawn than direct with one CPU's weights and 2.00 with another's,
# on the bound; 2,000 read 1.05 with the latter.
N_DIGITS = 2000


@pytest.mark.proof
def test_real_digits_drawn_by_a_user_are_read_as_well_as_mnist_itself(
    real_run: tuple[Path, dict], mnist: MNISTArrays, tmp_path: Path
) -> None:
    run, summary = real_run
    images, labels = mnist.test_images[:N_DIGITS], mnist.test_labels[:N_DIGITS]
    rng = random.Random(0)
    for i, digit in enumerate(images):
        scale = rng.uniform(3, 8)
        size = round(28 * scale)
        canvas = (size + rng.randint(20, 400), size + rng.randint(20, 400))
        offset = (rng.randint(0, canvas[0] - size), rng.randint(0, canvas[1] - size))
        ink = (0, 0, 0) if i % 3 else rng.choice([(20, 40, 170), (160, 20, 20), (20, 100, 40)])
        picture = as_drawn(Image.frombytes("L", (28, 28), bytes(digit.flatten().tolist())), scale, canvas,
                           offset, ink)  # fmt: skip
        picture = picture if i % 3 == 0 else picture.convert("L")
        if i % 2:
            picture.save(tmp_path / f"{i:04d}.png")
        else:
            picture.save(tmp_path / f"{i:04d}.jpg", quality=90)
    result = CliRunner().invoke(app, ["predict", str(run), str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    guesses = torch.tensor([json.loads(line)["digit"] for line in result.stdout.splitlines()])
    drawn = int((guesses == labels).sum())
    direct = int((P.classify(P.ready_model(run), images).argmax(1) == labels).sum())
    print(
        f"\n{N_DIGITS} MNIST test digits drawn large, dark on white, off-centre (PNG and JPEG): "
        f"{100 * drawn / N_DIGITS:.2f}%; the same digits read directly: {100 * direct / N_DIGITS:.2f}%; "
        f"the model's test accuracy (10,000 digits): {100 * summary['test_acc']:.2f}%"
    )
    # Counts, not float32 ratios: exactly 2 points apart once read as 2.0000019.
    assert 100 * abs(drawn - direct) <= 2 * N_DIGITS
