"""Regenerate ``generated.txt``, the synthetic half of the tokenizer corpus.

The hand-written ``*.txt`` files beside this script carry natural prose; this script adds breadth: a wide
vocabulary in varied sentence frames, numbers, dates, logs, records and small code fragments, so that the
BPE merges cover more than one register of English. It is deterministic (fixed seed, no hashing of sets),
so re-running it reproduces ``generated.txt`` byte for byte. Run: ``python services/modelgen/corpus/build_corpus.py``.
"""

from __future__ import annotations

import random
from pathlib import Path

SEED = 20240611
TARGET_BYTES = 115_000

NOUNS = """
abbey acorn actor address adventure afternoon agreement airport alarm album alley almanac amber anchor angle
animal ankle answer antenna apartment apple apron arch archive argument arrow artist ash attic auction author
avalanche avenue axis badge baggage bakery balcony ballad balloon bamboo banner barn barrel basin basket bay
beacon beard beetle bell bench berry bicycle blanket blossom boat bonfire border bottle boulder bracelet branch
bread breeze brick bridge brook broom bucket budget buffalo bundle burrow butter button cabin cable cactus
calendar camera campfire canal candle canoe canyon captain caravan carpet cart castle catalogue cathedral cave
cellar chain chair chalk chamber channel chapel chart cheese cherry chimney chorus circle citizen city clay
cliff clock cloud coast coat coconut coin collar comet compass concert copper coral corner cottage cotton
council country courtyard crane crater creek crystal cupboard curtain cushion customer dagger dam dancer
daughter debate deck delta desert desk diary dinner doctor dolphin doorway dragon drawer dream drum dune
eagle earth echo editor elbow elephant embassy emerald engine envelope estate evening factory falcon farmer
feather fence ferry festival field figure finger fire fisherman flag flame flute fog forest fortress fountain
fox frame friend frost garden garlic gate gazette gem giant glacier glass glove goat gold grain granite grape
grass gravel guitar gull hammer harbor harp harvest hat hawk hazel heart hedge helmet hermit highway hill hive
holiday honey horizon horse hospital hotel hunter hut ice idea inch ink insect island ivory jacket jar jewel
journal journey judge jungle kettle key kingdom kitchen kite knot ladder lagoon lake lamp lantern lawn leaf
ledger lemon letter library lighthouse lily lion lizard lobster lock locomotive loom lumber machine magnet
mailbox manor map marble market marsh mask meadow melody merchant meteor mill mirror mist monastery monkey
moon morning moss mountain mule museum mushroom musician needle nest net newspaper night notebook novel oak
oar ocean office olive onion orchard orchestra otter oven owl paddle painter palace pantry paper parade parcel
parrot passenger pasture path pebble pelican pencil pepper piano pier pigeon pillow pilot pine pipe planet
plank plateau poet pond porch portrait potato pottery prairie prince prism pumpkin puzzle quarry queen quilt
rabbit raft railway rainbow ranch raven reef ribbon ridge river robin rocket roof rope rose ruin saddle sailor
salmon sand satchel scarf scholar school scissors sculptor season shadow shelf shell shepherd ship shore
shovel signal silk silver singer sketch sky sled slope smoke snail snow soldier song sparrow spice spider
spire spring square squirrel stable stadium staircase star statue steam stone storm stove stream street
student studio sugar suitcase summit sunrise sunset swamp swan sword table tailor teacher telescope temple
tent terrace thicket thread thunder ticket tide tiger timber torch tower town tractor trail train treasure
tree trumpet tulip tunnel turtle umbrella valley vase velvet village vine violin volcano voyage wagon wall
walnut wardrobe warehouse waterfall wave weaver well whale wheat wheel whistle willow window winter wizard
wolf workshop yard yarn zebra
""".split()

ADJECTIVES = """
ancient anxious bare bitter blunt bold brave breezy bright brisk broad brittle bronze busy calm careful
cheerful chilly clever clumsy cloudy coarse cold colorful comfortable crimson crisp crooked crowded curious
damp dark dazzling deep delicate dense distant dizzy drowsy dusty eager early elegant empty enormous faint
familiar famous fearless fierce flat fluffy foggy fragile fresh friendly frozen gentle giant gigantic
glossy golden graceful grand gray greasy green grim gusty handsome hasty heavy hidden hollow honest huge
humble hungry icy idle immense jagged jolly keen kind large lazy lean little lively lonely loud lovely lucky
magnificent massive meager mellow merry misty modern modest muddy narrow nervous noble noisy odd old orange
ordinary painted pale patient peaceful plain pleasant polished polite proud purple quaint quick quiet ragged
rapid rare restless rich rocky rough round rusty sacred salty scarlet shallow sharp shiny short silent
silver simple sleepy slender slim slow small smooth soft solemn sour sparkling spicy splendid sturdy sudden
sunny swift tall tame tender thick thin tidy tiny tired tough tranquil twisted vast velvet vivid warm wary
weary wet whispering wide wild windy wise wooden worn young zealous
""".split()

# (base, third person, past, present participle)
VERBS = [
    tuple(v.split("/"))
    for v in """
admire/admires/admired/admiring carry/carries/carried/carrying chase/chases/chased/chasing
climb/climbs/climbed/climbing collect/collects/collected/collecting cross/crosses/crossed/crossing
decorate/decorates/decorated/decorating deliver/delivers/delivered/delivering discover/discovers/discovered/discovering
draw/draws/drew/drawing explore/explores/explored/exploring find/finds/found/finding follow/follows/followed/following
gather/gathers/gathered/gathering guard/guards/guarded/guarding hide/hides/hid/hiding
inspect/inspects/inspected/inspecting
keep/keeps/kept/keeping lift/lifts/lifted/lifting measure/measures/measured/measuring mend/mends/mended/mending
notice/notices/noticed/noticing open/opens/opened/opening paint/paints/painted/painting plant/plants/planted/planting
polish/polishes/polished/polishing protect/protects/protected/protecting pull/pulls/pulled/pulling
push/pushes/pushed/pushing reach/reaches/reached/reaching repair/repairs/repaired/repairing
rescue/rescues/rescued/rescuing search/searches/searched/searching sell/sells/sold/selling
share/shares/shared/sharing sketch/sketches/sketched/sketching study/studies/studied/studying
visit/visits/visited/visiting wash/washes/washed/washing watch/watches/watched/watching
weigh/weighs/weighed/weighing wrap/wraps/wrapped/wrapping build/builds/built/building
bring/brings/brought/bringing catch/catches/caught/catching choose/chooses/chose/choosing
describe/describes/described/describing fold/folds/folded/folding borrow/borrows/borrowed/borrowing
examine/examines/examined/examining greet/greets/greeted/greeting hang/hangs/hung/hanging
load/loads/loaded/loading pack/packs/packed/packing photograph/photographs/photographed/photographing
record/records/recorded/recording sort/sorts/sorted/sorting steer/steers/steered/steering
sweep/sweeps/swept/sweeping tie/ties/tied/tying trade/trades/traded/trading unlock/unlocks/unlocked/unlocking
""".split()
]

INTRANSITIVE = """
arrived wandered hesitated laughed lingered waited slept shivered vanished sang whispered drifted returned
trembled paused glowed faded rested sighed shouted wept listened murmured stumbled sparkled blossomed
""".split()

ADVERBS = """
quietly slowly carefully eagerly gently suddenly patiently cheerfully bravely quickly silently proudly
happily nervously barely briskly calmly clumsily curiously faithfully gracefully hastily honestly loosely
merrily politely rarely roughly softly steadily swiftly thoughtfully warmly wearily boldly
""".split()

PREPOSITIONS = "across along behind beneath beside beyond near over through toward under within past around".split()

TIMES = """
at dawn|before breakfast|after the rain|in early spring|late in the autumn|during the long winter|
on market day|at midnight|just after noon|by the end of the week|in the middle of summer|once the fog lifted|
when the bells rang|as the tide turned|on the first frosty morning|years later|the following evening
""".replace("\n", "").split("|")

FIRST_NAMES = """
Ada Amara Anselm Arlo Beatrix Bram Cato Cleo Dalia Dorian Edda Elio Ember Felix Fiora Gideon Greta Hale
Hugo Ines Ivo Juno Kasimir Lark Lena Linus Mabel Milo Nell Odile Oren Pia Quill Rafe Rosa Sabine Silas Tamsin
Theo Una Vera Wren Xavier Yara Zeno
""".split()

TOWNS = (
    """
Aldermoor Brackenhurst Copperfold Dunmere Elmsford Fallowmere Glenhaven Hartwell Ironbridge Juniper Cross
Kestrel Bay Larkfield Millbrook Northcliff Oakhollow Pebblestone Quarrington Ravensworth Saltmarsh Thornbury
Umberley Vale Westerham Yarrowdale
""".replace(" Cross", "_Cross")
    .replace(" Bay", "_Bay")
    .replace(" Vale", "_Vale")
    .split()
)

UNITS = ["kilograms", "meters", "liters", "hours", "minutes", "kilometers", "grams", "degrees", "seconds", "crates"]


def _a(rng: random.Random, word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def noun_phrase(rng: random.Random) -> str:
    noun = rng.choice(NOUNS)
    roll = rng.random()
    if roll < 0.35:
        return "the " + rng.choice(ADJECTIVES) + " " + noun
    if roll < 0.6:
        return _a(rng, rng.choice(ADJECTIVES) + " " + noun)
    if roll < 0.8:
        return "the " + noun
    return rng.choice(["two", "three", "several", "many", "a few", "seven", "a dozen"]) + " " + noun + "s"


def town(rng: random.Random) -> str:
    return rng.choice(TOWNS).replace("_", " ")


def sentence(rng: random.Random) -> str:
    name = rng.choice(FIRST_NAMES)
    base, third, past, ing = rng.choice(VERBS)
    frame = rng.randrange(10)
    if frame == 0:
        s = f"{name} {past} {noun_phrase(rng)} {rng.choice(PREPOSITIONS)} {noun_phrase(rng)}"
    elif frame == 1:
        s = f"{rng.choice(TIMES).capitalize()}, {name} {rng.choice(ADVERBS)} {past} {noun_phrase(rng)}"
    elif frame == 2:
        s = f"Every {rng.choice(['morning', 'evening', 'Sunday', 'season', 'year'])}, {name} {third} {noun_phrase(rng)}"
    elif frame == 3:
        s = f"{noun_phrase(rng).capitalize()} {rng.choice(INTRANSITIVE)} {rng.choice(PREPOSITIONS)} {noun_phrase(rng)}"
    elif frame == 4:
        s = f"While {ing} {noun_phrase(rng)}, {name} noticed {noun_phrase(rng)} in {town(rng)}"
    elif frame == 5:
        s = f"Nobody in {town(rng)} could remember who first {past} {noun_phrase(rng)}"
    elif frame == 6:
        other = rng.choice(FIRST_NAMES)
        s = f"{name} asked {other} to {base} {noun_phrase(rng)} {rng.choice(TIMES)}"
    elif frame == 7:
        s = f"It is said that {noun_phrase(rng)} once {past} {noun_phrase(rng)} {rng.choice(PREPOSITIONS)} {town(rng)}"
    elif frame == 8:
        s = f"{name} would rather {base} {noun_phrase(rng)} than {rng.choice(VERBS)[0]} {noun_phrase(rng)}"
    else:
        s = f"{noun_phrase(rng).capitalize()} and {noun_phrase(rng)} {rng.choice(INTRANSITIVE)} {rng.choice(ADVERBS)}"
    return s + rng.choice([".", ".", ".", "!", "?"] if frame in (6, 8) else ["."])


def paragraph(rng: random.Random) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(3, 7)))


def ledger(rng: random.Random) -> str:
    lines = [f"Ledger of the {rng.choice(NOUNS)} cooperative, {town(rng)}, {rng.randint(1850, 2030)}"]
    for _ in range(rng.randint(4, 8)):
        day, month = rng.randint(1, 28), rng.randint(1, 12)
        qty = rng.randint(1, 950)
        price = rng.randint(5, 99999) / 100
        lines.append(
            f"{rng.randint(1990, 2029)}-{month:02d}-{day:02d}  {rng.choice(NOUNS):<12} {qty:>4} {rng.choice(UNITS):<10}"
            f" @ {price:>8.2f}  total {qty * price:>10.2f}"
        )
    return "\n".join(lines)


def weather_log(rng: random.Random) -> str:
    lines = [f"Weather station {town(rng)} (elevation {rng.randint(2, 2400)} m)"]
    for hour in range(0, 24, rng.choice([3, 4, 6])):
        lines.append(
            f"{hour:02d}:00 temp={rng.uniform(-12, 34):.1f}C humidity={rng.randint(20, 100)}% "
            f"wind={rng.choice(['N', 'NE', 'E', 'SE', 'S', 'SW', 'W', 'NW'])} {rng.randint(0, 80)} km/h "
            f"pressure={rng.uniform(960, 1045):.1f} hPa"
        )
    return "\n".join(lines)


def arithmetic(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(3, 6)):
        a, b = rng.randint(0, 9999), rng.randint(1, 999)
        op = rng.randrange(4)
        if op == 0:
            out.append(f"{a} + {b} = {a + b}")
        elif op == 1:
            out.append(f"{a} - {b} = {a - b}")
        elif op == 2:
            out.append(f"{a % 100} x {b % 100} = {(a % 100) * (b % 100)}")
        else:
            out.append(f"{a} divided by {b} is {a // b} remainder {a % b}")
    return "\n".join(out)


def code_snippet(rng: random.Random) -> str:
    noun, other = rng.choice(NOUNS), rng.choice(NOUNS)
    verb = rng.choice(VERBS)[0]
    limit = rng.randint(2, 500)
    if rng.random() < 0.5:
        return (
            f"def {verb}_{noun}s({noun}s: list[str], limit: int = {limit}) -> dict[str, int]:\n"
            f'    """{verb.capitalize()} each {noun} and count it by its first letter."""\n'
            f"    counts: dict[str, int] = {{}}\n"
            f"    for {noun} in {noun}s[:limit]:\n"
            f'        key = {noun}[0].upper() if {noun} else "?"\n'
            f"        counts[key] = counts.get(key, 0) + 1\n"
            f"    return counts\n"
        )
    cls = noun.capitalize() + other.capitalize()
    return (
        f"class {cls}Registry:\n"
        f"    def __init__(self, capacity: int = {limit}) -> None:\n"
        f"        self.capacity = capacity\n"
        f"        self._items: list[str] = []\n\n"
        f"    def {verb}(self, item: str) -> bool:\n"
        f"        if len(self._items) >= self.capacity:\n"
        f'            raise RuntimeError(f"{noun} registry is full ({{self.capacity}} items)")\n'
        f"        self._items.append(item)\n"
        f"        return True\n"
    )


def record(rng: random.Random) -> str:
    name = rng.choice(FIRST_NAMES)
    return (
        f'{{"id": {rng.randint(1, 99999)}, "name": "{name} {rng.choice(TOWNS).split("_")[0]}", '
        f'"town": "{town(rng)}", "item": "{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}", '
        f'"count": {rng.randint(0, 500)}, "active": {rng.choice(["true", "false"])}}}'
    )


def dialogue(rng: random.Random) -> str:
    base, third, past, ing = rng.choice(VERBS)
    thing = noun_phrase(rng)
    return (
        f"User: Who {past} {thing} in {town(rng)}?\n"
        f"Assistant: According to the {rng.choice(['records', 'old stories', 'town archive', 'local newspaper'])}, "
        f"it was {rng.choice(FIRST_NAMES)}, who spent {rng.randint(2, 40)} {rng.choice(['days', 'weeks', 'years'])} "
        f"{ing} it {rng.choice(ADVERBS)}."
    )


def build(seed: int = SEED, target_bytes: int = TARGET_BYTES) -> str:
    rng = random.Random(seed)
    makers = [paragraph] * 6 + [ledger, weather_log, arithmetic, code_snippet, record, dialogue]
    parts: list[str] = []
    size = 0
    while size < target_bytes:
        part = rng.choice(makers)(rng)
        parts.append(part)
        size += len(part.encode("utf-8")) + 2
    return "\n\n".join(parts) + "\n"


def main() -> None:
    out = Path(__file__).with_name("generated.txt")
    out.write_text(build(), encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
