"""The 28x28 10-class datasets eightgen knows: per dataset name, its title, Hub name and class names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DatasetName = Literal["mnist", "fashion_mnist"]


@dataclass(frozen=True)
class ClassSet:
    """One dataset's ten classes: how the report names them and where the Hub keeps the data."""

    name: str  # the DatasetConfig.name
    title: str  # "MNIST"
    hub_name: str  # the Hugging Face Hub dataset
    names: tuple[str, ...]  # class index -> name
    noun: str  # what one class is called: "digit" or "class"

    @property
    def numeric(self) -> bool:
        """Whether the class names are the class indices themselves (MNIST's digits)."""
        return all(n == str(i) for i, n in enumerate(self.names))

    @property
    def nouns(self) -> str:
        """The plural of noun: "digits", "classes"."""
        return self.noun + ("es" if self.noun.endswith("s") else "s")

    def name_of(self, k: int | str) -> str:
        """The class name of index k: "8" for MNIST, "Bag" for Fashion-MNIST."""
        return self.names[int(k)]

    def label(self, k: int | str) -> str:
        """The class as a phrase that stands alone: "digit 8" for MNIST, "Bag" for Fashion-MNIST."""
        return f"{self.noun} {self.name_of(k)}" if self.numeric else self.name_of(k)

    def with_article(self, k: int | str) -> str:
        """The class name after "a" or "an": "an 8", "a 3", "a Bag", "an Ankle boot"."""
        name = self.name_of(k)
        return f"{'an' if name[:1].lower() in 'aeio8' else 'a'} {name}"

    def plural(self, k: int | str) -> str:
        """Many of the class: "8s", "Bags", "T-shirt/top images"."""
        name = self.name_of(k)
        if self.numeric:
            return f"{name}s"
        return f"{name} images" if "/" in name or name.endswith("s") else f"{name}s"


MNIST = ClassSet("mnist", "MNIST", "ylecun/mnist", tuple(str(d) for d in range(10)), "digit")
FASHION_MNIST = ClassSet(
    "fashion_mnist",
    "Fashion-MNIST",
    "zalando-datasets/fashion_mnist",
    ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "class",
)
CLASS_SETS: dict[str, ClassSet] = {c.name: c for c in (MNIST, FASHION_MNIST)}


def classes_of(name: str) -> ClassSet:
    """The ClassSet of a dataset name (mnist, fashion_mnist)."""
    try:
        return CLASS_SETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(CLASS_SETS)}") from None
