"""The prompts a draft head trains on (`train.train_draft`) and is judged on.

Training questions are a topic in one of a few forms: the topics are a curated list, then whole
words of the target's vocabulary (thousands), so the answers cover many subjects. Held-out
questions ask about topics no training prompt has, so the held-out acceptance measures what the
head learned about the target, not the prompts it saw.
"""

from __future__ import annotations

import random
import re
from typing import Sequence

TOPICS = ["the ocean", "volcanoes", "the moon", "honey bees", "electric cars", "photosynthesis", "the Roman Empire",
          "black holes", "rainforests", "the human heart", "coffee", "chess", "the internet", "earthquakes",
          "recycling", "sleep", "vaccines", "the solar system", "dinosaurs", "music theory", "renewable energy",
          "the printing press", "penguins", "glaciers", "the stock market", "yoga", "bread baking", "airplanes",
          "the immune system", "deserts", "a healthy diet", "time management", "public speaking", "gardening",
          "the water cycle", "friendship", "saving money", "video games", "mountains", "the brain", "rain",
          "electricity", "the pyramids of Egypt", "birds", "cooking pasta", "exercise", "reading books",
          "climate change", "robots", "the history of writing", "magnets", "trees", "photography", "soccer",
          "learning to swim", "the Arctic", "smartphones", "bridges", "whales", "the alphabet", "teamwork",
          "stars", "insects", "painting", "trains", "tea", "the seasons", "clouds", "fire safety", "libraries"]

FORMS = ["Tell me about {t}.", "Explain {t} in simple terms.", "What are some interesting facts about {t}?",
         "Write a short paragraph about {t}.", "Why is {t} important?", "Give me three tips related to {t}.",
         "How would you describe {t} to a ten-year-old?", "What is the history of {t}?",
         "Write a short poem about {t}.", "What are the pros and cons of {t}?", "Summarize what you know about {t}.",
         "What questions do people often ask about {t}? Answer two of them.",
         "Write a short story that involves {t}.", "List a few common misconceptions about {t}.",
         "How does {t} affect everyday life?", "Write an encouraging note to someone curious about {t}."]


HELDOUT_TOPICS = ["lighthouses", "origami", "the Great Wall of China", "octopuses", "hot air balloons", "jazz",
                  "coral reefs", "bicycles", "kites", "chocolate", "the Olympic Games", "submarines"]


def vocabulary_words(tokenizer, vocab_size: int) -> list[str]:
    """Whole lower-case words (6+ letters) that are single tokens of a byte-level BPE vocabulary:
    thousands of topics for prompts (none for vocabularies without such tokens)."""
    words = []
    for i in range(vocab_size):
        try:
            piece = tokenizer.id_to_token(i)
        except Exception:
            continue
        if isinstance(piece, str) and piece[:1] in ("\u0120", "\u2581") and re.fullmatch("[a-z]{6,}", piece[1:]):
            words.append(piece[1:])
    return words


def chat_prompts(n: int, seed: int = 0, words: Sequence[str] = ()) -> list[str]:
    """`n` distinct training questions: a topic (TOPICS, then `words`) in one of FORMS, drawn with
    `seed`. HELDOUT_TOPICS never appear (`heldout_prompts` asks about those)."""
    held = {t.lower() for t in HELDOUT_TOPICS}
    topics = TOPICS + [w for w in words if w not in held and w not in TOPICS]
    rng = random.Random(seed)
    if n > len(topics) * len(FORMS):
        raise ValueError(f"at most {len(topics) * len(FORMS)} built-in prompts; pass a prompt file for more")
    picked: dict[tuple[int, int], None] = {}
    while len(picked) < n:
        picked.setdefault((rng.randrange(len(topics)), rng.randrange(len(FORMS))))
    return [FORMS[f].format(t=topics[t]) for t, f in picked]


def heldout_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` questions about HELDOUT_TOPICS (topics no training prompt has)."""
    pairs = [f.format(t=t) for t in HELDOUT_TOPICS for f in FORMS]
    random.Random(seed).shuffle(pairs)
    return pairs[:n]
