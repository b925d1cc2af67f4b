"""Regenerate corpus.txt, the bundled English text the tiny base's tokenizer is trained on.

Deterministic: the same script always writes the same bytes. The sentences are built from small
hand-written word lists (no third-party text), so the corpus carries no licence of its own.
Run: ``python trainer/assets/make_corpus.py`` (writes trainer/assets/corpus.txt).
"""
from __future__ import annotations

import random
from pathlib import Path

NAMES = ["Anna", "Ben", "Clara", "David", "Elena", "Frank", "Grace", "Henry", "Iris", "Jack",
         "Karen", "Leo", "Maria", "Noah", "Olivia", "Peter", "Rosa", "Samuel", "Tara", "Victor"]
ANIMALS = ["cat", "dog", "horse", "bird", "fox", "rabbit", "sheep", "goat", "owl", "mouse"]
PLURAL = {"fox": "foxes", "sheep": "sheep", "mouse": "mice"}
THINGS = ["book", "letter", "lamp", "basket", "cup", "key", "coat", "map", "clock", "garden",
          "window", "table", "bridge", "river", "road", "house", "boat", "bell", "song", "story"]
PLACES = ["the village", "the market", "the old mill", "the library", "the station", "the hill",
          "the harbour", "the forest", "the school", "the kitchen", "the town square", "the farm"]
TIMES = ["in the morning", "at noon", "in the evening", "at night", "on Sunday", "after supper",
         "before dawn", "in the spring", "in the winter", "during the storm", "every day"]
ADJ = ["small", "quiet", "bright", "old", "new", "warm", "cold", "heavy", "light", "careful",
       "happy", "tired", "clever", "gentle", "simple", "strange", "green", "red", "blue", "long"]
VERBS_PAST = ["found", "carried", "opened", "painted", "mended", "watched", "followed", "counted",
              "cleaned", "closed", "read", "wrote", "sold", "bought", "lost", "kept", "gave", "took"]
VERBS_INF = ["find", "carry", "open", "paint", "mend", "watch", "follow", "count", "clean",
             "close", "read", "write", "sell", "buy", "keep", "give", "take", "answer", "explain"]
ADVERBS = ["slowly", "quickly", "quietly", "carefully", "gladly", "again", "together", "alone"]
TOPICS = ["numbers", "water", "weather", "history", "music", "language", "trees", "stars",
          "bread", "machines", "questions", "answers", "lessons", "mathematics", "words"]
SYLLABLES = ["ka", "lo", "mi", "ten", "ru", "sa", "po", "ne", "vi", "da", "ko", "ri", "mu", "ta",
             "le", "fo", "zi", "ba", "no", "he"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve"]


def _plural(word: str) -> str:
    return PLURAL.get(word, word + "s")


def _sentence(r: random.Random) -> str:
    kind = r.randrange(16)
    n, m = r.choice(NAMES), r.choice(NAMES)
    if kind == 0:
        return f"{n} {r.choice(VERBS_PAST)} the {r.choice(ADJ)} {r.choice(THINGS)} {r.choice(TIMES)}."
    if kind == 1:
        return f"The {r.choice(ANIMALS)} walked {r.choice(ADVERBS)} to {r.choice(PLACES)}."
    if kind == 2:
        return f"{n} asked {m}, \"Will you help me {r.choice(VERBS_INF)} the {r.choice(THINGS)}?\""
    if kind == 3:
        return f"\"Yes,\" said {n}, \"I can {r.choice(VERBS_INF)} it {r.choice(TIMES)}.\""
    if kind == 4:
        a, b = r.randrange(100), r.randrange(100)
        return f"What is {a} + {b}? The answer is {a + b}."
    if kind == 5:
        a, b = r.randrange(100), r.randrange(100)
        hi, lo = max(a, b), min(a, b)
        return f"What is {hi} - {lo}? It is {hi - lo}."
    if kind == 6:
        k = r.randrange(2, 13)
        return f"There were {NUMBER_WORDS[k]} {_plural(r.choice(ANIMALS))} near {r.choice(PLACES)}, and {n} counted {k} of them."
    if kind == 7:
        return f"{n} likes to {r.choice(VERBS_INF)} and to learn about {r.choice(TOPICS)}."
    if kind == 8:
        return f"Question: why is the {r.choice(THINGS)} so {r.choice(ADJ)}? Answer: because {n} made it that way."
    if kind == 9:
        return f"In {1700 + r.randrange(300)}, the people of {r.choice(PLACES)[4:]} built a {r.choice(ADJ)} {r.choice(THINGS)}."
    if kind == 10 and r.random() < 0.5:
        return f"The system said to the user: the assistant will {r.choice(VERBS_INF)} the {r.choice(THINGS)}."
    if kind == 10:
        return f"You are a helpful assistant. The user wants to {r.choice(VERBS_INF)} a {r.choice(THINGS)}; explain it {r.choice(ADVERBS)}."
    if kind == 11:
        return f"{n} and {m} {r.choice(VERBS_PAST)} {r.choice(['a', 'the', 'one'])} {r.choice(THINGS)}, then went home {r.choice(ADVERBS)}."
    if kind == 12:
        a, b = r.randrange(13), r.randrange(13)
        return f"{a} times {b} is {a * b}; {a} plus {b} is {a + b}."
    if kind == 13:
        return f"It was {r.choice(ADJ)} and {r.choice(ADJ)} {r.choice(TIMES)}, so {n} stayed at {r.choice(PLACES)}."
    if kind == 14:
        a, b = r.randrange(100), r.randrange(100)
        return (f"{n} is a calculator. {m} asked: {r.choice(['Compute', 'How much is', 'What is'])} "
                f"{a} + {b}? Answer with the number only: {a + b}.")
    parts = [r.choice(SYLLABLES) for _ in range(r.randrange(2, 5))]
    return (f"{n} can join syllables into one word. Join the syllables: {' + '.join(parts)}. "
            f"The word is {''.join(parts)}, and {m} wrote the word only.")


def make_corpus(seed: int = 1234, paragraphs: int = 480) -> str:
    r = random.Random(seed)
    out = []
    for k in range(paragraphs):
        if k % 6 == 5:  # a transcript: role names at line starts, as a chat template writes them
            a, b = r.randrange(100), r.randrange(100)
            out.append(f"system\nYou are a helpful assistant.\nuser\nWhat is {a} + {b}?\n"
                       f"assistant\n{a + b}\nuser\n{_sentence(r)}\nassistant\n{_sentence(r)}")
            continue
        out.append(" ".join(_sentence(r) for _ in range(r.randrange(3, 8))))
    return "\n\n".join(out) + "\n"


if __name__ == "__main__":
    target = Path(__file__).with_name("corpus.txt")
    target.write_text(make_corpus(), encoding="utf-8")
