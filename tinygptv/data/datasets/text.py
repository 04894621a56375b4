# Text facts shared by the dataset readers: the official caption cleaner (`blip_caption`), the box string and the
# instruction pools, copied verbatim from the official dataset classes (TinyGPT-V / MiniGPT-v2 minigpt4/datasets).
# Data path: dataset files -> reader (uses these) -> Sample -> batch builder -> model.
from __future__ import annotations

import re

_PUNCT = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def blip_caption(text: str, max_words: int = 50) -> str:
    """LAVIS/MiniGPT `blip_caption` text processor, reproduced exactly because the model was trained on its output.

    Lowercase; replace each of . ! " ( ) * # : ; ~ by a space; replace every run of two or more whitespace characters
    by one space (a single tab or newline is kept, as in the official regex); strip; keep the first `max_words`
    space-separated words."""
    text = _PUNCT.sub(" ", text.lower())
    text = _SPACES.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


# Stage 3 (cc_sbu_align): MiniGPT-4's prompts/alignment.txt, without its "<Img><ImageHere></Img> " prefix.
ALIGNMENT_PROMPTS = (
    "Describe this image in detail.",
    "Take a look at this image and describe what you notice.",
    "Please provide a detailed description of the picture.",
    "Could you describe the contents of this image for me?",
)

# [vqa]: COCO-VQA, OK-VQA, A-OKVQA, GQA, OCR-VQA. Slot = the processed question.
VQA_POOL = (
    "[vqa] {}",
    "[vqa] Based on the image, respond to this question with a short answer: {}",
)

# [caption]: TextCaps and COCO caption use "[caption] " + one of these 17 prompts (trailing spaces are original).
CAPTION_PROMPTS = (
    "Briefly describe this image.",
    "Provide a concise depiction of this image.",
    "Present a short description of this image.",
    "Summarize this image in a few words.",
    "A short image caption:",
    "A short image description:",
    "A photo of ",
    "An image that shows ",
    "Write a short description for the image. ",
    "Write a description for the photo.",
    "Provide a description of what is presented in the photo.",
    "Briefly describe the content of the image.",
    "Can you briefly explain what you see in the image?",
    "Could you use a few words to describe what you perceive in the photo?",
    "Please provide a short depiction of the picture.",
    "Using language, provide a short account of the image.",
    "Use a few words to illustrate what is happening in the picture.",
)
CAPTION_POOL = tuple(f"[caption] {prompt}" for prompt in CAPTION_PROMPTS)

# [refer]: RefCOCO/+/g and Visual Genome. Slot = the processed expression; answer = the box string.
REFER_POOL = (
    "[refer] {}",
    "[refer] give me the location of {}",
    "[refer] where is {} ?",
    "[refer] from this image, tell me the location of {}",
    "[refer] the location of {} is",
    "[refer] could you tell me the location for {} ?",
    "[refer] where can I locate the {} ?",
)

# [identify]: inverse RefCOCO/+/g. Slot = the box string; answer = the processed expression.
IDENTIFY_POOL = (
    "[identify] {}",
    "[identify] what object is in this location {}",
    "[identify] identify the object present at this location {}",
    "[identify] what is it in {}",
    "[identify] describe this object in {}",
    "[identify] this {} is",
    "[identify] the object in {} is",
)

# [grounding]: Flickr30k grounded captions (no slot).
GROUNDING_POOL = (
    "[grounding] please describe this image in details",
    "[grounding] describe this image as detailed as possible",
    "[grounding] summarize this image in details",
    "[grounding] give a thorough description of what you see in this image",
)

# [detection]: Flickr30k caption-to-phrase and phrase-to-box. Slot = the caption or the phrase.
DETECTION_POOL = ("[detection] {}",)
