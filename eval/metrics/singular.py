"""Singular of an English noun, as pattern.en's `singularize` gives it (pattern 3.6, as CHAIR's
reference pins it).

CHAIR's reference (LisaAnne/Hallucination `utils/chair.py`) singularizes every caption word with
pattern.en before matching the COCO synonyms, and the published CHAIR numbers carry its results,
good and bad: "buses" -> "bus" but "bus" -> "bu" (so a lone "bus" is never an object), "glass" ->
"glas" (the reference maps "wine glas" back), "ties" -> "ty", "cookies" and "collies" stay plural.
The rules are restated here rather than imported, so as not to depend on pattern (unmaintained since
2018); the order of the checks and of the suffix rules is pattern's: the first that applies wins.

The input is one lowercase token without apostrophes (eval/tasks/chair.py's tokenizer splits them off).
"""

from __future__ import annotations

import re

# A token that is the tail of one of these words is returned as it is (pattern tests
# `listed.endswith(token)`, so "ice" is kept because of "rice", and "s" because of "debris").
KEPT = frozenset("""
    bison debris headquarters pincers trout bream diabetes herpes pliers tuna breeches djinn
    high-jinks proceedings whiting britches eland homework rabies wildebeest carp elk innings salmon
    chassis flounder jackanapes scissors christmas gallows mackerel series clippers georgia measles
    shears cod graffiti mews species contretemps mumps swine corps news swiss
    advice equipment happiness luggage software bread fruit information mathematics progress
    understanding butter furniture ketchup mayonnaise research water cheese garbage knowledge meat
    rice electricity gravel love mustard sand
    """.split())

# "<word>s" stays as it is for these -ie words (pattern lists "^pie" and "^tie" with a literal
# caret, which never matches: "ties" -> "ty", "pies" -> "py").
IE_WORDS = frozenset("""
    alergie cutie hoagie newbie softie veggie auntie doggie hottie nightie sortie weenie beanie
    eyrie indie oldie stoolie yuppie birdie freebie junkie sweetie zombie bogie goonie laddie pixie
    techie bombie groupie laramie quickie collie hankie lingerie reverie toughie cookie hippie
    meanie rookie valkyrie
    """.split())

# Irregular plural endings (a token ending in one is rewritten there: "women" -> "woman").
IRREGULAR = {
    "atlantes": "atlas", "atlases": "atlas", "axes": "axe", "beeves": "beef", "brethren": "brother",
    "children": "child", "corpora": "corpus", "corpuses": "corpus", "ephemerides": "ephemeris",
    "feet": "foot", "ganglia": "ganglion", "geese": "goose", "genera": "genus", "genii": "genie",
    "graffiti": "graffito", "helves": "helve", "kine": "cow", "leaves": "leaf", "loaves": "loaf",
    "men": "man", "mongooses": "mongoose", "monies": "money", "moves": "move", "mythoi": "mythos",
    "numena": "numen", "occipita": "occiput", "octopodes": "octopus", "opera": "opus",
    "opuses": "opus", "our": "my", "oxen": "ox", "penes": "penis", "penises": "penis",
    "people": "person", "sexes": "sex", "soliloquies": "soliloquy", "teeth": "tooth",
    "testes": "testis", "trilbys": "trilby", "turves": "turf", "zoa": "zoon",
}

# Compounds whose second part is one of these inflect their first part ("mothers-in-law").
PREPOSITIONS = frozenset("""
    about before during of till above behind except off to across below for on under after beneath
    from onto until among beside in out unto around besides into over upon at between near since
    with athwart betwixt beyond but by
    """.split())

# (pattern, replacement), tried in order; the first that matches is applied once. A group that
# did not take part in the match is replaced by nothing.
SUFFIX_RULES = [(re.compile(p), r) for p, r in (
    (r"(.)ae$", r"\1a"), (r"(.)itis$", r"\1itis"), (r"(.)eaux$", r"\1eau"),
    (r"(quiz)zes$", r"\1"), (r"(matr)ices$", r"\1ix"), (r"(ap|vert|ind)ices$", r"\1ex"),
    (r"^(ox)en", r"\1"), (r"(alias|status)es$", r"\1"),
    (r"([octop|vir])i$", r"\1us"),  # a character class in pattern too: "safari" -> "safarus"
    (r"(cris|ax|test)es$", r"\1is"), (r"(shoe)s$", r"\1"), (r"(o)es$", r"\1"),
    (r"(bus)es$", r"\1"), (r"([m|l])ice$", r"\1ouse"), (r"(x|ch|ss|sh)es$", r"\1"),
    (r"(m)ovies$", r"\1ovie"), (r"(.)ombies$", r"\1ombie"), (r"(s)eries$", r"\1eries"),
    (r"([^aeiouy]|qu)ies$", r"\1y"),
    (r"([aeo]l)ves$", r"\1f"), (r"([^d]ea)ves$", r"\1f"), (r"arves$", "arf"),
    (r"erves$", "erve"), (r"([nlw]i)ves$", r"\1fe"), (r"([lr])ves$", r"\1f"),
    (r"([aeo])ves$", r"\1ve"), (r"(sive)s$", r"\1"), (r"(tive)s$", r"\1"), (r"(hive)s$", r"\1"),
    (r"([^f])ves$", r"\1fe"),
    (r"(^analy)ses$", r"\1sis"),
    (r"((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
    (r"(.)opses$", r"\1opsis"), (r"(.)yses$", r"\1ysis"), (r"(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
    (r"(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"),
    (r"(.)oses$", r"\1osis"),
    (r"([ti])a$", r"\1um"),  # "pasta" -> "pastum", as pattern does
    (r"(n)ews$", r"\1ews"), (r"s$", ""),
)]


def singularize(word: str) -> str:
  if "-" in word:
    first, *rest = word.split("-")
    if rest and rest[0] in PREPOSITIONS:
      return "-".join([singularize(first), *rest])
  if any(kept.endswith(word) for kept in KEPT):
    return word
  if any(word.endswith(ie + "s") for ie in IE_WORDS):
    return word
  for plural, singular in IRREGULAR.items():  # no ending here is the tail of another
    if word.endswith(plural):
      return word[:len(word) - len(plural)] + singular
  for pattern, replacement in SUFFIX_RULES:
    if pattern.search(word):
      return pattern.sub(replacement, word, count=1)
  return word
