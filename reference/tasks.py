"""The reference model's tasks: procedurally generated, seeded, each item a prompt and its answer.

Three families of skills that differ enough for experts to specialise:

- grounding: a picture of 1-4 coloured shapes, "Find the bounding box of "red circle"." ->
  ``{"bbox_2d": [x1, y1, x2, y2]}`` in 0..1000 coordinates, with the calibration loader's English and
  Turkish templates (Turkish templates name the shape in Turkish);
- visual questions: the colour of a shape, how many shapes, left or right of another shape;
- text: two-digit addition and subtraction, English<->Turkish words from a fixed lexicon,
  reversing letters, sorting digits.

Everything is a pure function of a ``random.Random``: the same seed gives the same items, images
included, on any machine.  Training, the held-out evaluation set and the calibration sets draw from
the same distribution with different seeds.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 128  # pixels, square: 8x8 patches of 16, 16 visual tokens after the 2x2 merge
BACKGROUND = (235, 235, 230)

COLORS = {  # English name -> (Turkish name, RGB)
    "red": ("kırmızı", (215, 40, 40)),
    "green": ("yeşil", (40, 170, 60)),
    "blue": ("mavi", (40, 80, 220)),
    "yellow": ("sarı", (225, 200, 30)),
    "purple": ("mor", (140, 60, 180)),
    "orange": ("turuncu", (240, 130, 30)),
}
SHAPES = {"square": "kare", "circle": "daire", "triangle": "üçgen"}

GROUNDING_EN = (
    'Find the bounding box of "{region}".',
    'Locate "{region}" in the image.',
    'Where is "{region}" located?',
    'Output the bounding box of "{region}" as {{"bbox_2d": [x1, y1, x2, y2]}}.',
)
GROUNDING_TR = (
    'Görselde "{region}" nesnesini bul.',
    '"{region}" nerede?',
)

LEXICON = {  # English -> Turkish, fixed
    "apple": "elma", "water": "su", "bread": "ekmek", "house": "ev", "book": "kitap", "cat": "kedi",
    "dog": "köpek", "bird": "kuş", "tree": "ağaç", "flower": "çiçek", "sun": "güneş", "moon": "ay",
    "star": "yıldız", "sea": "deniz", "river": "nehir", "mountain": "dağ", "road": "yol", "car": "araba",
    "door": "kapı", "window": "pencere", "table": "masa", "chair": "sandalye", "milk": "süt",
    "cheese": "peynir", "egg": "yumurta", "fish": "balık", "hand": "el", "eye": "göz", "head": "baş",
    "heart": "kalp", "friend": "arkadaş", "child": "çocuk", "mother": "anne", "father": "baba",
    "school": "okul", "city": "şehir", "village": "köy", "day": "gün", "night": "gece", "year": "yıl",
    "rain": "yağmur", "snow": "kar", "wind": "rüzgar", "fire": "ateş", "stone": "taş", "gold": "altın",
    "key": "anahtar", "letter": "mektup", "song": "şarkı", "garden": "bahçe",
}
LETTERS = "abcdefghijklmnoprstuvyz"

TASK_FAMILIES = {
    "grounding": ("grounding",),
    "visual": ("color", "count", "position"),
    "text": ("arithmetic", "translate", "reverse", "sort"),
}
TASKS = tuple(task for tasks in TASK_FAMILIES.values() for task in tasks)
IMAGE_TASKS = TASK_FAMILIES["grounding"] + TASK_FAMILIES["visual"]


def family_of(task: str) -> str:
    return next(family for family, tasks in TASK_FAMILIES.items() if task in tasks)


@dataclass(frozen=True)
class Shape:
    color: str
    kind: str
    box: tuple[int, int, int, int]  # pixels, inclusive corners as drawn

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"

    @property
    def turkish_name(self) -> str:
        return f"{COLORS[self.color][0]} {SHAPES[self.kind]}"

    @property
    def center_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    def bbox_1000(self) -> list[int]:
        """The box in Qwen-VL's 0..1000 coordinates (x1, y1, x2, y2)."""
        return [round(v * 1000 / IMAGE_SIZE) for v in self.box]


@dataclass
class Item:
    task: str
    prompt: str
    answer: str
    image: Image.Image | None = None
    bbox_2d: list[int] | None = None  # grounding: the target box, 0..1000

    def record(self, image_path: str | None) -> dict:
        """The evaluation-file record: exact-match items carry ``answer``, grounding ``bbox_2d``."""
        record = {"task": self.task, "prompt": self.prompt, "image": image_path}
        if self.bbox_2d is not None:
            record["bbox_2d"] = self.bbox_2d
        else:
            record["answer"] = self.answer
        return record

    def messages(self, image_ref: str | None = None, with_answer: bool = True) -> list[dict]:
        """The chat the model is trained on: the image first, then the question; the answer as the
        assistant's turn."""
        if self.image is None:
            content = self.prompt
        else:
            image_part = {"type": "image", "image": image_ref} if image_ref else {"type": "image"}
            content = [image_part, {"type": "text", "text": self.prompt}]
        messages = [{"role": "user", "content": content}]
        if with_answer:
            messages.append({"role": "assistant", "content": self.answer})
        return messages


def bbox_answer(box: list[int]) -> str:
    return json.dumps({"bbox_2d": [int(v) for v in box]})


# ------------------------------------------------------------------------------------------------ scenes

def _overlaps(a, b, gap: int = 4) -> bool:
    return not (a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1])


def random_scene(rng: random.Random, count: int) -> list[Shape]:
    """``count`` shapes of distinct colour+kind, 22-46 px, apart from each other."""
    while True:
        combos = rng.sample([(c, k) for c in COLORS for k in SHAPES], count)
        shapes: list[Shape] = []
        for color, kind in combos:
            for _ in range(50):
                w = rng.randint(22, 46)
                h = rng.randint(22, 46) if kind == "triangle" else w
                x0, y0 = rng.randint(2, IMAGE_SIZE - w - 3), rng.randint(2, IMAGE_SIZE - h - 3)
                box = (x0, y0, x0 + w, y0 + h)
                if not any(_overlaps(box, s.box) for s in shapes):
                    shapes.append(Shape(color, kind, box))
                    break
        if len(shapes) == count:
            return shapes


def draw(shapes: list[Shape]) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    pen = ImageDraw.Draw(image)
    for shape in shapes:
        x0, y0, x1, y1 = shape.box
        fill = COLORS[shape.color][1]
        if shape.kind == "square":
            pen.rectangle(shape.box, fill=fill)
        elif shape.kind == "circle":
            pen.ellipse(shape.box, fill=fill)
        else:
            pen.polygon([(x0, y1), ((x0 + x1) / 2, y0), (x1, y1)], fill=fill)
    return image


# ------------------------------------------------------------------------------------------------- tasks

def grounding(rng: random.Random) -> Item:
    shapes = random_scene(rng, rng.randint(1, 4))
    target = rng.choice(shapes)
    if rng.random() < 1 / 3:
        prompt = rng.choice(GROUNDING_TR).format(region=target.turkish_name)
    else:
        prompt = rng.choice(GROUNDING_EN).format(region=target.name)
    box = target.bbox_1000()
    return Item("grounding", prompt, bbox_answer(box), draw(shapes), bbox_2d=box)


def color(rng: random.Random) -> Item:
    while True:
        shapes = random_scene(rng, rng.randint(1, 4))
        kinds = [s.kind for s in shapes]
        unique = [s for s in shapes if kinds.count(s.kind) == 1]
        if unique:
            break
    target = rng.choice(unique)
    return Item("color", f"What color is the {target.kind}?", target.color, draw(shapes))


def count(rng: random.Random) -> Item:
    shapes = random_scene(rng, rng.randint(1, 4))
    return Item("count", "How many shapes are in the image?", str(len(shapes)), draw(shapes))


def position(rng: random.Random) -> Item:
    while True:
        shapes = random_scene(rng, rng.randint(2, 4))
        a, b = rng.sample(shapes, 2)
        if abs(a.center_x - b.center_x) >= 12:
            break
    answer = "left" if a.center_x < b.center_x else "right"
    prompt = f"Is the {a.name} to the left or to the right of the {b.name}?"
    return Item("position", prompt, answer, draw(shapes))


def arithmetic(rng: random.Random) -> Item:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return Item("arithmetic", f"What is {a} + {b}?", str(a + b))
    a, b = max(a, b), min(a, b)
    return Item("arithmetic", f"What is {a} - {b}?", str(a - b))


def translate(rng: random.Random) -> Item:
    english, turkish = rng.choice(sorted(LEXICON.items()))
    if rng.random() < 0.5:
        return Item("translate", f"Translate to Turkish: {english}", turkish)
    return Item("translate", f"Translate to English: {turkish}", english)


def reverse(rng: random.Random) -> Item:
    letters = [rng.choice(LETTERS) for _ in range(rng.randint(3, 6))]
    return Item("reverse", f"Reverse the letters: {' '.join(letters)}", " ".join(reversed(letters)))


def sort(rng: random.Random) -> Item:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
    return Item("sort", f"Sort the digits: {' '.join(map(str, digits))}", " ".join(map(str, sorted(digits))))


GENERATORS = {f.__name__: f for f in (grounding, color, count, position, arithmetic, translate, reverse, sort)}
assert tuple(GENERATORS) == TASKS


def make_item(rng: random.Random, task: str) -> Item:
    return GENERATORS[task](rng)


def draw_items(seed: int, count_per_task: int, tasks=TASKS) -> list[Item]:
    """``count_per_task`` items of each task, interleaved task by task; the same for the same seed."""
    rng = random.Random(seed)
    items = []
    for _ in range(count_per_task):
        for task in tasks:
            items.append(make_item(rng, task))
    return items


def corpus_lines() -> list[str]:
    """Text the tokenizer is trained on: every word, number and template the tasks can produce."""
    rng = random.Random(0)
    lines = [item.prompt + " " + item.answer for item in draw_items(1234, 200)]
    lines += [" ".join(LEXICON), " ".join(LEXICON.values()), " ".join(LETTERS)]
    lines += [f"{c} {t} {k} {v}" for c, (t, _) in COLORS.items() for k, v in SHAPES.items()]
    lines += [" ".join(str(rng.randint(0, 1000)) for _ in range(20)) for _ in range(20)]
    return lines
