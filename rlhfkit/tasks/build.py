"""Build the built-in default task: everyday requests with verifiable instructions.

Run ``python -m rlhfkit.tasks.build`` to (re)write ``train.jsonl`` and ``eval.jsonl`` beside
this file. The output is deterministic (seeded): the committed files are exactly what this
script writes, and ``tests/test_task.py`` checks that.

How a prompt is made:

1. A *base request* written by us (below, :data:`BASES`): a category, a form (``prose``,
   ``list``, ``poem``, ``letter`` or ``data``: which instructions make sense for it), the request
   text and a few topic words an on-topic answer naturally uses (they become
   ``topic_keywords`` for the rubric's off-topic check and candidates for keyword instructions).
2. 1–3 *instructions* (kinds of :mod:`rlhfkit.feedback.rubric`) drawn with weights that favour
   instructions a 135M-parameter model can learn to follow (lowercase, word limits, start / end
   phrases, keywords, no commas), so RL has signal; pairs that contradict each other or make
   the counting ambiguous are never drawn together (:data:`CONFLICTS`, one layout instruction at
   most).
3. Each instruction is phrased with one of several templates and appended to the request.

Every base request gets :data:`VARIANTS` prompts with different instruction sets. The split is
by base request (20 % of each category held out for eval), so no eval request — not even with
other instructions — is ever seen in training.

JSONL line: ``{"id", "prompt", "instructions", "category", "base_id", "topic_keywords"}``.

Measured signal (SmolLM2-135M-Instruct, 24 eval prompts, one sample each, T = 0.7, 160 new
tokens, bf16): 45 % of instructions followed, 29 % of answers following all of theirs, mean gold
score 0.22 — far from 0 and from 1, so rankings by the gold rubric carry signal for RL.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from rlhfkit.data.jsonl import write_jsonl
from rlhfkit.feedback.rubric import validate_instruction

SEED = 20261121
VARIANTS = 3
EVAL_SHARE = 0.2
HERE = Path(__file__).resolve().parent

# form | request | topic words (the first is the main topic word)
BASES = """
# cooking
prose | Explain how to cook fluffy white rice on the stove. | rice water pot heat
list | Suggest a quick breakfast I can make in ten minutes before work. | breakfast eggs toast oats
prose | How do I keep a cast iron pan from rusting? | pan iron oil rust
list | What should I keep in my pantry so I can always cook a simple dinner? | pantry rice pasta beans
prose | Describe how to make a simple tomato sauce for pasta. | sauce tomato garlic pasta
prose | Why should I let meat rest after cooking it? | meat juice rest heat
list | Give me ideas for using up leftover bread. | bread toast crumbs pudding
prose | How can I tell when an avocado is ripe? | avocado ripe skin soft
data | Write a short recipe card for a green salad. | salad lettuce dressing cucumber
list | How can I cut down on food waste in my kitchen? | food waste fridge leftovers
prose | Explain the difference between baking soda and baking powder. | baking soda powder acid
data | Plan a simple vegetarian dinner menu for four friends. | dinner vegetables menu dessert
# travel
list | What should I pack for a weekend trip to the mountains? | pack jacket boots water
prose | Give advice for someone taking their first long train journey. | train journey seat ticket
list | How can I save money on a city trip? | money trip museum walk
prose | How do I deal with jet lag after a long flight? | sleep flight light water
letter | Write a short message to a hotel asking if early check-in is possible. | hotel check room arrival
list | What are good habits for staying safe while travelling alone? | safe travel phone plan
prose | Describe a perfect lazy day at the beach. | beach sand sun sea
data | Make a one-day sightseeing plan for a small old town. | town morning afternoon walk
prose | Explain how to choose a good backpack for hiking. | backpack straps weight hiking
list | Give tips for a long road trip with friends. | road car music snacks
prose | What should I know before renting a car abroad? | car rental insurance license
# health habits
prose | Why is drinking enough water important during the day? | water body energy drink
list | Give simple ways to sit less during a work day. | walk stand break desk
prose | How can I build a habit of going to bed earlier? | sleep bed routine evening
list | Suggest some easy stretches for stiff shoulders. | stretch shoulders arms neck
prose | Explain why a short walk after lunch can be good for you. | walk lunch digestion energy
list | What are healthy snacks to keep at my desk? | snacks nuts fruit yogurt
prose | How do I start running if I have never run before? | running walk minutes shoes
prose | Give advice on taking breaks from screens to rest my eyes. | eyes screen break look
list | How can I make my mornings calmer and less rushed? | morning plan breakfast time
prose | What are the benefits of eating more vegetables? | vegetables fiber vitamins health
# money
prose | Explain what an emergency fund is and why it matters. | fund emergency savings money
list | Give tips for sticking to a monthly budget. | budget spending money track
prose | How can I stop making impulse purchases online? | purchases cart wait money
prose | Explain compound interest to a teenager. | interest money grow years
list | What are easy ways to lower my grocery bill? | grocery list price store
prose | Should I pay off debt or save first? Give a balanced view. | debt save interest money
data | Describe a simple plan for saving for a holiday in six months. | save holiday month money
list | What questions should I ask before signing a phone contract? | contract phone price months
prose | Explain the difference between a debit card and a credit card. | card debit credit bank
# work emails
letter | Write an email to my manager asking for a day off next Friday. | friday manager leave day
letter | Write an email thanking a colleague for helping with a project. | thank project help colleague
letter | Write an email to reschedule a meeting to next week. | meeting week schedule time
letter | Write a polite follow-up email after a job interview. | interview thank role position
letter | Write an email introducing myself to a new team. | team name work role
letter | Write an email to a client explaining that a delivery will be late. | delivery late client sorry
letter | Write an email inviting coworkers to a farewell lunch. | lunch farewell team invite
letter | Write an email asking a coworker to review a document by Thursday. | document review thursday feedback
letter | Write an out-of-office reply for a two-week vacation. | office vacation return contact
letter | Write an email declining a meeting invitation politely. | meeting decline sorry time
# study tips
list | How can I study better for a math exam? | exam practice problems math
prose | Explain the idea of spaced repetition for learning. | repetition review memory learn
list | Give tips for taking good notes in a lecture. | notes lecture write ideas
prose | How do I stay focused when studying at home? | focus study phone break
prose | How can I learn a new language a little every day? | language words practice day
list | What are ways to prepare for a presentation in class? | presentation practice slides audience
prose | How can I make a study schedule that I will actually follow? | schedule study time plan
prose | Why is sleep important before an exam? | sleep exam memory rest
list | How can I get better at reading long books? | reading books pages time
# pets
prose | How do I help a new puppy settle in at home? | puppy home bed training
list | What do I need before adopting a cat? | cat litter food bowl
prose | How often should I walk my dog? | dog walk day exercise
prose | How can I tell if my cat is happy? | cat purr play happy
list | Give tips for keeping a pet fish healthy. | fish tank water food
prose | How do I introduce a new pet to my old pet? | pet slow space introduce
prose | Explain how to trim a dog's nails safely. | nails dog trim paw
list | What are good ways to keep an indoor rabbit entertained? | rabbit toys play space
prose | How can I help my dog stay calm during fireworks? | dog fireworks calm noise
# gardening
prose | How do I start growing herbs on a windowsill? | herbs pots sun water
list | What vegetables are easy for beginner gardeners? | vegetables garden tomatoes beans
prose | How often should I water my houseplants? | water plants soil pot
prose | Explain how to make compost at home. | compost scraps leaves soil
list | Give tips for keeping a balcony garden alive in summer. | balcony plants water sun
prose | Why are bees important for a garden? | bees flowers pollen garden
prose | How do I repot a plant that has grown too big? | pot plant roots soil
list | How can I attract birds to my garden? | birds feeder water garden
prose | What is the best way to plant tulip bulbs? | tulip bulbs soil autumn
# tech help
prose | How do I make a strong password that I can remember? | password words long letters
list | My laptop is slow. What can I check first? | laptop programs memory restart
prose | Explain what a cloud backup is in simple words. | backup cloud files copy
prose | How can I spot a phishing email? | email link sender phishing
list | Give tips for making my phone battery last longer. | battery phone screen apps
prose | Explain what a browser cookie is. | cookie browser website data
prose | How do I set up a new home printer? | printer wifi driver paper
list | What can I do if my home wifi keeps dropping? | wifi router signal restart
prose | Explain the difference between RAM and storage. | memory storage files computer
prose | How can I keep my old photos organised on my computer? | photos folders dates files
# sports
prose | Explain the basic rules of football to a beginner. | ball goal team players
list | Give tips for a first-time visitor to a tennis court. | tennis racket ball court
prose | Why is warming up before exercise important? | warm muscles exercise injury
prose | How do I choose a good pair of running shoes? | shoes running feet fit
list | How can I improve my swimming technique? | swimming breathing arms kick
prose | Describe what makes a good team captain. | team captain players lead
prose | How should I prepare for my first five kilometre race? | race run training kilometre
list | What equipment do I need to start cycling to work? | bike helmet lights lock
prose | Explain why rest days matter for athletes. | rest muscles recovery training
# history facts
prose | Explain why the printing press changed the world. | printing books press ideas
prose | Describe how people kept food cold before refrigerators. | ice food cold cellar
prose | Tell me briefly how the first airplane flight happened. | airplane flight brothers wright
prose | Why did ancient people build roads? | roads trade travel armies
prose | Explain what the Silk Road was. | silk road trade china
prose | Describe what daily life was like in a medieval village. | village farm medieval church
prose | Explain how the first calendars were created. | calendar moon sun days
prose | Why were lighthouses important for sailors? | lighthouse ships light sailors
prose | Describe the history of the bicycle in a few words. | bicycle wheels ride pedals
# poems
poem | Write a short poem about a rainy morning. | rain morning window grey
poem | Write a short poem about a cat sleeping in the sun. | cat sun sleep warm
poem | Write a poem about the first day of spring. | spring flowers green sun
poem | Write a short poem about drinking tea with a friend. | tea friend cup warm
poem | Write a poem about a city at night. | city night lights street
poem | Write a short poem about the ocean. | ocean waves sea blue
poem | Write a poem about an old tree in a park. | tree park leaves old
poem | Write a short poem about missing home. | home miss heart family
poem | Write a funny poem about a lost sock. | sock lost laundry foot
poem | Write a poem about the moon over a lake. | moon lake light water
poem | Write a short poem for a friend's birthday. | birthday friend cake year
poem | Write a poem about autumn leaves. | autumn leaves red fall
# product descriptions
data | Write a product description for a reusable water bottle. | bottle water steel reusable
data | Write a product description for a cozy wool blanket. | blanket wool warm soft
data | Write a product description for a small desk lamp. | lamp light desk bright
data | Write a product description for a pair of noise-cancelling headphones. | headphones noise sound music
data | Write a product description for a handmade ceramic mug. | mug ceramic coffee handmade
data | Write a product description for a lightweight rain jacket. | jacket rain waterproof light
data | Write a product description for a wooden cutting board. | board wood kitchen cutting
data | Write a product description for a pack of scented candles. | candles scent wax calm
data | Write a product description for a foldable travel umbrella. | umbrella rain travel fold
data | Write a product description for a simple alarm clock. | clock alarm time morning
# letters
letter | Write a letter to my grandmother telling her about my new job. | grandmother job work love
letter | Write a thank-you note to a neighbour who watered my plants. | neighbour plants thank water
letter | Write a letter to a friend who moved to another country. | friend miss country visit
letter | Write a note to my landlord about a leaking kitchen tap. | tap leak kitchen repair
letter | Write a letter of recommendation for a reliable babysitter. | babysitter children reliable trust
letter | Write a letter to my future self to open in ten years. | future years hope life
letter | Write a short welcome note for guests staying in my flat. | guests welcome flat keys
letter | Write a letter to the city council asking for a new bike lane. | bike lane council street
letter | Write a note to a teacher thanking them for a great year. | teacher year thank class
letter | Write an apology letter to a friend for missing their party. | sorry party friend missed
# home and cleaning
list | How do I keep my bathroom clean with little effort? | bathroom clean towel mirror
prose | How can I remove a coffee stain from a white shirt? | stain coffee water shirt
list | Give tips for decluttering a small bedroom. | clutter clothes space boxes
prose | How do I clean a microwave easily? | microwave water lemon steam
list | How can I make my home warmer in winter without raising the bill? | warm heat curtains winter
prose | Explain how to wash a wool sweater by hand. | wool sweater water wash
data | Make a weekly cleaning schedule for a small apartment. | cleaning monday week kitchen
prose | How do I get rid of fruit flies in the kitchen? | flies fruit trap vinegar
# science explainers
prose | Explain why the sky is blue. | sky light blue sun
prose | Explain how a rainbow forms. | rainbow light rain colors
prose | Why do we have seasons on Earth? | seasons earth sun tilt
prose | Explain how plants make their own food. | plants light sun leaves
prose | Why does ice float on water? | ice water float dense
prose | Explain what causes thunder. | thunder lightning air sound
prose | How do vaccines help the body fight illness? | vaccine body immune germs
prose | Explain why the moon changes shape during the month. | moon sun light phases
prose | What makes bread rise? | bread yeast dough gas
prose | Explain how a magnet works in simple terms. | magnet metal poles force
# hobbies and free time
list | How can I get started with drawing as an adult? | drawing pencil practice sketch
prose | Suggest how to start a book club with friends. | book club friends meet
list | What are fun things to do on a rainy weekend at home? | rainy games books cook
prose | How do I learn to play the guitar on my own? | guitar chords practice songs
list | Give ideas for a cheap but fun birthday party. | party birthday games cake
prose | How can I start journaling and keep it up? | journal write day notes
prose | Explain how to take better photos with a phone. | photos light phone camera
list | Suggest hobbies that help with stress. | stress hobby calm walk
prose | How can I make new friends in a new city? | friends city clubs meet
# family and everyday life
prose | How can I help a child build a reading habit? | reading child books story
list | Give ideas for a family game night. | games family cards snacks
prose | How do I plan a calm morning routine for school days? | morning school breakfast bags
prose | How can I split household chores fairly with roommates? | chores roommates list share
list | What should I bring to a picnic in the park? | picnic blanket food drinks
prose | How can I be a good listener when a friend is upset? | listen friend feelings questions
prose | Give advice for moving to a new apartment. | moving boxes apartment pack
list | How can I reduce plastic use at home? | plastic bags bottles reuse
prose | How do I politely say no to extra work? | work time polite manager
prose | Explain how to prepare for a job interview. | interview questions company practice
"""

FORMS = ("prose", "list", "poem", "letter", "data")

# ----------------------------------------------------------------------------------------------
# instruction kinds: which forms they suit, how often they are drawn (easy ones more often)

WEIGHTS = {
    "lowercase": 3.0,
    "word_count": 3.0,
    "end_phrase": 3.0,
    "include_keywords": 3.0,
    "no_commas": 3.0,
    "start_phrase": 3.0,
    "forbidden_words": 2.0,
    "title": 2.0,
    "uppercase": 1.5,
    "postscript": 1.5,
    "sentence_count": 1.5,
    "keyword_frequency": 1.5,
    "placeholders": 1.5,
    "bullet_count": 2.0,
    "quotation": 1.0,
    "paragraph_count": 1.0,
    "numbered_sections": 1.0,
    "highlights": 1.0,
    "line_count": 1.0,
    "json_format": 2.0,
}

_COMMON = {
    "lowercase",
    "uppercase",
    "word_count",
    "include_keywords",
    "forbidden_words",
    "keyword_frequency",
    "start_phrase",
    "end_phrase",
    "no_commas",
    "title",
}
ALLOWED = {
    "prose": _COMMON
    | {"sentence_count", "paragraph_count", "numbered_sections", "highlights", "postscript", "quotation"},
    "list": _COMMON | {"bullet_count", "numbered_sections", "json_format", "line_count", "highlights"},
    "poem": _COMMON | {"line_count", "paragraph_count", "quotation"},
    "letter": _COMMON | {"placeholders", "postscript", "paragraph_count", "sentence_count", "highlights"},
    "data": _COMMON | {"json_format", "bullet_count", "sentence_count", "placeholders", "highlights"},
}

# at most one instruction that fixes the layout of the whole answer
LAYOUT = {
    "bullet_count",
    "paragraph_count",
    "numbered_sections",
    "line_count",
    "json_format",
    "quotation",
    "sentence_count",
}
# JSON goes only with instructions that make sense inside JSON
JSON_OK = {"json_format", "lowercase", "include_keywords", "forbidden_words", "word_count"}
CONFLICTS = {
    frozenset({"lowercase", "uppercase"}),
    frozenset({"quotation", "title"}),
    frozenset({"quotation", "postscript"}),
    frozenset({"end_phrase", "postscript"}),  # the P.S. would have to come after the end phrase
    frozenset({"title", "start_phrase"}),  # the title comes first
    frozenset({"highlights", "bullet_count"}),  # both use asterisks
    frozenset({"keyword_frequency", "include_keywords"}),  # keep keyword demands simple
    frozenset({"sentence_count", "postscript"}),  # would the P.S. count as a sentence?
}

START_PHRASES = {
    "prose": ["Here is", "Sure", "Good question", "In short", "Let me explain", "The answer is simple"],
    "list": ["Here are", "Sure", "Here is what I suggest", "Try these", "Good question"],
    "poem": ["Once upon", "In the", "Softly", "Listen"],
    "letter": ["Dear", "Hello", "Hi", "Good morning"],
    "data": ["Here is", "Sure", "Here is a plan"],
    "product": ["Meet", "Introducing", "Here is"],
}
END_PHRASES = {
    "prose": [
        "Is there anything else I can help with?",
        "Hope this helps!",
        "Let me know if you have additional questions.",
        "That is all.",
        "Good luck!",
    ],
    "list": ["Is there anything else I can help with?", "Hope this helps!", "Have fun!", "Good luck!"],
    "poem": ["The end.", "And that is all.", "Goodnight."],
    "letter": ["Best wishes.", "Thank you.", "See you soon!", "Kind regards."],
    "data": ["Enjoy!", "Is there anything else I can help with?", "Hope this helps!"],
    "product": ["Order yours today!", "Enjoy!"],
}
FORBIDDEN = [
    "very",
    "really",
    "important",
    "good",
    "just",
    "simple",
    "always",
    "thing",
    "great",
    "best",
    "easy",
    "nice",
    "like",
    "also",
]

PHRASINGS: dict[str, list[str]] = {
    "lowercase": [
        "Your entire response should be in lowercase letters; no capital letters are allowed.",
        "Write everything in lowercase, with no capital letters at all.",
        "Use only lowercase letters in your answer.",
    ],
    "uppercase": [
        "Your entire response should be in capital letters only.",
        "Write your whole answer in CAPITAL LETTERS.",
        "Use only uppercase letters in your answer.",
    ],
    "word_count/at_most": [
        "Answer in at most {n} words.",
        "Use no more than {n} words.",
        "Keep it short: {n} words or fewer.",
    ],
    "word_count/at_least": ["Write at least {n} words.", "Your answer should contain {n} words or more."],
    "sentence_count/at_most": ["Use at most {n} sentences.", "Answer in no more than {n} sentences."],
    "sentence_count/exactly": ["Answer in exactly {n} sentences.", "Your response must have exactly {n} sentences."],
    "sentence_count/at_least": ["Write at least {n} sentences.", "Use {n} sentences or more."],
    "paragraph_count": [
        "Your response should have exactly {n} paragraphs, separated by the markdown divider ***.",
        "Write exactly {n} paragraphs separated by blank lines.",
    ],
    "paragraph_count/poem": ["Write it in exactly {n} stanzas separated by a blank line."],
    "include_keywords": [
        "Include {the_words} in your response.",
        "Make sure to use {the_words}.",
        "Mention {the_words} somewhere in your answer.",
    ],
    "forbidden_words": [
        "Do not use {the_words} anywhere in your answer.",
        "Avoid {the_words}.",
        "Never use {the_words}.",
    ],
    "keyword_frequency": [
        "Use the word '{kw}' at least {n} times.",
        "The word '{kw}' should appear {n} times or more.",
    ],
    "bullet_count": [
        "Give exactly {n} bullet points using markdown, such as '* first point'.",
        "Format your answer as exactly {n} markdown bullet points starting with '* '.",
    ],
    "json_format": [
        "Wrap your entire output in JSON format.",
        "Your whole answer must be valid JSON; you may use a ```json code block.",
        "Answer only with a JSON object.",
    ],
    "title": [
        "Include a title wrapped in double angular brackets, such as <<my title>>.",
        "Give your answer a title in double angular brackets, like <<a title>>.",
    ],
    "start_phrase": ["Start your answer with the words '{phrase}'.", "Begin your response with '{phrase}'."],
    "end_phrase": [
        "Finish your response with this exact phrase, with no other words after it: '{phrase}'",
        "End your answer with the exact phrase '{phrase}' and nothing after it.",
    ],
    "quotation": [
        "Wrap your entire response with double quotation marks.",
        "Put your whole answer inside double quotes.",
    ],
    "placeholders": [
        "Include at least {n} placeholders in square brackets, such as [address].",
        "Use at least {n} placeholders like [name] for details to fill in later.",
    ],
    "postscript": [
        "At the end of your response, add a postscript starting with {marker}",
        "Add a postscript that begins with {marker} at the end.",
    ],
    "no_commas": [
        "Do not use any commas in your response.",
        "Your entire answer must avoid commas.",
        "Write without using a single comma.",
    ],
    "numbered_sections": [
        "Your response must have {n} sections; start each on its own line with {labels}.",
        "Split your answer into {n} parts, each beginning on a new line with {labels}.",
    ],
    "highlights": [
        "Highlight at least {n} phrases with markdown, like *highlighted phrase*.",
        "Use markdown to highlight at least {n} key phrases, for example *this one*.",
    ],
    "line_count": ["Your answer must be exactly {n} lines long.", "Write exactly {n} lines, no more and no less."],
    "line_count/poem": ["The poem must have exactly {n} lines."],
}

NUM_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 8: "eight"}


def parse_bases(text: str = BASES) -> list[dict[str, Any]]:
    """The base requests as dicts: id, category, form, request, topic words."""
    bases, category = [], None
    for lineno, line in enumerate(text.strip().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            category = line[1:].strip()
            continue
        form, request, topics = (p.strip() for p in line.split("|"))
        if form not in FORMS:
            raise ValueError(f"BASES line {lineno}: unknown form {form!r}")
        bases.append(
            {"base_id": len(bases), "category": category, "form": form, "request": request, "topics": topics.split()}
        )
    return bases


def _num(rng: random.Random, n: int) -> str:
    return NUM_WORDS[n] if n in NUM_WORDS and rng.random() < 0.4 else str(n)


def _quoted_list(ws: list[str]) -> str:
    q = [f"'{w}'" for w in ws]
    return q[0] if len(q) == 1 else ", ".join(q[:-1]) + " and " + q[-1]


def _params(kind: str, base: dict, rng: random.Random) -> dict[str, Any]:
    """Draw the parameters of one instruction for a base request."""
    form = base["form"]
    if kind == "word_count":
        if rng.random() < 0.75:
            choices = {"poem": [40, 60], "letter": [60, 80, 100], "list": [50, 70, 90]}.get(form, [30, 40, 50, 60, 80])
            return {"relation": "at_most", "n": rng.choice(choices)}
        return {"relation": "at_least", "n": rng.choice([40, 50, 60])}
    if kind == "sentence_count":
        rel = rng.choice(["at_most", "at_most", "exactly", "at_least"])
        n = {"at_most": [2, 3, 4], "exactly": [2, 3], "at_least": [4, 5]}[rel]
        return {"relation": rel, "n": rng.choice(n)}
    if kind == "paragraph_count":
        return {"n": rng.choice([2, 3])}
    if kind == "include_keywords":
        return {"keywords": rng.sample(base["topics"], k=rng.choice([1, 1, 2]))}
    if kind == "forbidden_words":
        pool = [w for w in FORBIDDEN if w not in base["topics"]]
        return {"words": rng.sample(pool, k=rng.choice([1, 1, 2]))}
    if kind == "keyword_frequency":
        return {"keyword": base["topics"][0], "relation": "at_least", "n": rng.choice([2, 3])}
    if kind == "bullet_count":
        return {"n": rng.choice([3, 4, 5])}
    pool = "product" if base["category"] == "product descriptions" else form
    if kind == "start_phrase":
        return {"phrase": rng.choice(START_PHRASES[pool])}
    if kind == "end_phrase":
        return {"phrase": rng.choice(END_PHRASES[pool])}
    if kind == "placeholders":
        return {"n": rng.choice([1, 2, 3])}
    if kind == "postscript":
        return {"marker": rng.choice(["P.S.", "P.S.", "P.P.S."])}
    if kind == "numbered_sections":
        return {"n": rng.choice([2, 3]), "marker": "Step" if form == "list" else rng.choice(["Section", "Part"])}
    if kind == "highlights":
        return {"n": rng.choice([1, 2, 3])}
    if kind == "line_count":
        return {"n": rng.choice([4, 6, 8] if form == "poem" else [3, 4, 5])}
    return {}  # lowercase, uppercase, json_format, title, quotation, no_commas


def phrase(spec: dict[str, Any], form: str, rng: random.Random) -> str:
    """One instruction sentence for ``spec``."""
    kind = spec["kind"]
    key = kind
    if f"{kind}/{form}" in PHRASINGS:
        key = f"{kind}/{form}"
    elif "relation" in spec and f"{kind}/{spec['relation']}" in PHRASINGS:
        key = f"{kind}/{spec['relation']}"
    template = rng.choice(PHRASINGS[key])
    fields: dict[str, Any] = {}
    if "n" in spec:
        fields["n"] = _num(rng, spec["n"])
    if kind in ("include_keywords", "forbidden_words"):
        ws = spec["keywords" if kind == "include_keywords" else "words"]
        fields["the_words"] = ("the word " if len(ws) == 1 else "the words ") + _quoted_list(ws)
    if kind == "keyword_frequency":
        fields["kw"] = spec["keyword"]
    if kind in ("start_phrase", "end_phrase"):
        fields["phrase"] = spec["phrase"]
    if kind == "postscript":
        fields["marker"] = spec["marker"]
    if kind == "numbered_sections":
        fields["labels"] = _quoted_list([f"{spec['marker']} {i}" for i in range(1, spec["n"] + 1)])
    if spec.get("n") == 1:  # singular: "at least one key phrase"
        template = template.replace("phrases", "phrase").replace("placeholders", "placeholder")
    return template.format(**fields)


def compatible(specs: list[dict[str, Any]]) -> bool:
    """Whether a set of instructions can all be followed by one natural answer."""
    kinds = [s["kind"] for s in specs]
    if len(set(kinds)) != len(kinds):
        return False
    if sum(k in LAYOUT for k in kinds) > 1:
        return False
    if "json_format" in kinds and not set(kinds) <= JSON_OK:
        return False
    if any(frozenset({a, b}) in CONFLICTS for a in kinds for b in kinds if a != b):
        return False
    by = {s["kind"]: s for s in specs}
    wc = by.get("word_count")
    if wc and wc["relation"] == "at_least" and {"sentence_count", "line_count"} & set(kinds):
        return False
    if "forbidden_words" in by:
        banned = {w.lower() for w in by["forbidden_words"]["words"]}
        used = " ".join(
            [by.get("start_phrase", {}).get("phrase", ""), by.get("end_phrase", {}).get("phrase", "")]
            + by.get("include_keywords", {}).get("keywords", [])
            + [by.get("keyword_frequency", {}).get("keyword", "")]
        ).lower()
        if banned & set(used.replace("!", " ").replace("?", " ").replace(".", " ").split()):
            return False
    if "no_commas" in by and any("," in s.get("phrase", "") for s in specs):
        return False
    return True


def draw_instructions(base: dict, rng: random.Random) -> list[dict[str, Any]]:
    """1-3 compatible instructions for a base request (35 % one, 45 % two, 20 % three)."""
    k = rng.choices([1, 2, 3], weights=[35, 45, 20])[0]
    kinds = sorted(ALLOWED[base["form"]])
    for _ in range(200):
        chosen: list[dict[str, Any]] = []
        pool = list(kinds)
        while len(chosen) < k and pool:
            kind = rng.choices(pool, weights=[WEIGHTS[x] for x in pool])[0]
            pool.remove(kind)
            spec = {"kind": kind, **_params(kind, base, rng)}
            if compatible(chosen + [spec]):
                chosen.append(spec)
        if len(chosen) == k:
            return chosen
    raise RuntimeError(f"could not draw {k} compatible instructions for base {base['base_id']}")


def build(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    """All prompts of the task as (train, eval) lists of JSON-able dicts."""
    rng = random.Random(seed)
    bases = parse_bases()
    # hold out EVAL_SHARE of the base requests of each category (at least one)
    eval_ids: set[int] = set()
    for cat in dict.fromkeys(b["category"] for b in bases):
        ids = [b["base_id"] for b in bases if b["category"] == cat]
        eval_ids |= set(rng.sample(ids, k=max(1, round(EVAL_SHARE * len(ids)))))
    train, evals, seen = [], [], set()
    for base in bases:
        made = 0
        while made < VARIANTS:
            specs = draw_instructions(base, rng)
            prompt = " ".join([base["request"]] + [phrase(s, base["form"], rng) for s in specs])
            if prompt in seen:
                continue
            seen.add(prompt)
            for s in specs:
                validate_instruction(s)
            rec = {
                "id": f"task-{base['base_id']:03d}-{made}",
                "prompt": prompt,
                "instructions": specs,
                "category": base["category"],
                "base_id": base["base_id"],
                "topic_keywords": base["topics"],
            }
            (evals if base["base_id"] in eval_ids else train).append(rec)
            made += 1
    return train, evals


def main() -> None:
    train, evals = build()
    write_jsonl(HERE / "train.jsonl", train)
    write_jsonl(HERE / "eval.jsonl", evals)
    print(f"wrote {len(train)} train and {len(evals)} eval prompts to {HERE}")


if __name__ == "__main__":
    main()
