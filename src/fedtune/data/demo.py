"""Built-in demo task: customer-support ticket intent classification.

The tickets are generated from hand-written templates and slot fillers, so the demo needs
no download and is fully determined by its seed. The generator aims for text that a
person labels easily but a keyword matcher does not: most tickets avoid their own label
word, and a few mention another intent's word as a distractor.
"""

from __future__ import annotations

import random
from typing import Callable

DEMO_LABELS: tuple[str, ...] = ("billing", "shipping", "technical", "account", "refund", "feedback")

DEMO_PROMPT = (
    "Classify the intent of this customer support ticket as one of: "
    "billing, shipping, technical, account, refund, feedback.\n\n"
    "Ticket: {text}\n\n"
    "Answer with one word."
)

# Product tags say which templates make sense: "ship" = physical item that is delivered,
# "power" = electronic hardware, "app" = has software or a companion app,
# "sub" = recurring subscription, "login" = has its own sign-in.
_PRODUCTS: dict[str, frozenset[str]] = {
    "Aurora smart lamp": frozenset({"ship", "power", "app", "login"}),
    "StreamBox Plus": frozenset({"ship", "power", "app", "sub", "login"}),
    "TrailPro backpack": frozenset({"ship"}),
    "CloudNest Backup": frozenset({"app", "sub", "login"}),
    "Brewmaster coffee maker": frozenset({"ship", "power"}),
    "FitPulse watch": frozenset({"ship", "power", "app", "sub", "login"}),
}

# How often each intent concerns each product (same order as _PRODUCTS). The skew gives
# the `product` field a natural, non-IID relation to the label.
_PRODUCT_WEIGHTS: dict[str, tuple[float, ...]] = {
    "billing": (1.0, 4.0, 1.0, 4.5, 1.0, 2.0),
    "shipping": (2.0, 1.5, 4.5, 0.0, 3.5, 2.0),
    "technical": (3.5, 2.5, 0.0, 2.5, 2.5, 3.5),
    "account": (1.0, 3.0, 0.5, 4.0, 0.5, 3.5),
    "refund": (2.0, 1.5, 4.0, 1.0, 3.5, 2.0),
    "feedback": (2.0, 2.0, 2.0, 2.0, 2.0, 2.0),
}

_CHANNELS = ("email", "chat", "phone transcript", "web form", "social media")
_CHANNEL_WEIGHTS = (0.35, 0.3, 0.15, 0.12, 0.08)

# (template, required product tag or None). Placeholders are filled by _Slots.
_CORE: dict[str, list[tuple[str, str | None]]] = {
    "billing": [
        ("I was charged twice for order {order}, can you check which of the two payments is the real one?", None),
        ("My card ending in {last4} was billed {amount} on {date} but the price on your site was {amount2}.", None),
        ("Can you send me a proper invoice with our company name on it for order {order}? Our accountant needs it.", None),
        ("The payment keeps getting declined at checkout even though my card ending in {last4} works everywhere else.", None),
        ("How do I update the credit card on file for my {product} subscription? The old one expired.", "sub"),
        ("Why did my {product} plan renew at {amount} when I signed up for the {amount2} tier?", "sub"),
        ("There is a charge of {amount} from your company on my statement from {date} that I don't recognise.", None),
        ("I'd like to switch my {product} from monthly to yearly payments, what would that cost?", "sub"),
        ("The sales tax on my receipt looks wrong, it says {amount} on a {amount2} purchase.", None),
        ("Is it possible to pay for the {product} in instalments instead of all at once?", "ship"),
        ("My promo code didn't apply so I paid {amount} for the {product} instead of the sale price, can you fix the charge?", None),
        ("I need a copy of the receipt for order {order} showing the VAT, the confirmation email had no amounts.", None),
        ("You billed me {amount} for {product} but my free trial is supposed to run until {date}.", "sub"),
        ("Can I pay by bank transfer or PayPal instead of a card for my next order?", None),
        ("Our {product} invoice for {month} lists three seats but we only use one, please correct the amount.", "sub"),
        ("My statement shows a pending authorisation of {amount} that never dropped off after I placed order {order}.", None),
        ("The billing address on my invoice for order {order} is still my old one, can you correct it?", None),
        ("Which card is being charged for my {product} membership? I don't recognise the last four digits {last4}.", "sub"),
        ("The price went up from {amount2} to {amount} this month without any notice, why is that?", "sub"),
    ],
    "shipping": [
        ("Where is my order {order}? The tracking page hasn't changed since {date}.", None),
        ("My {product} was meant to arrive by {date} but the tracking still only says label created.", "ship"),
        ("Can I change the delivery address on order {order}? I'm moving to {city} next week.", None),
        ("The {carrier} driver marked my package as delivered but there is nothing at my door or with the neighbours.", None),
        ("Do you deliver the {product} to {country}, and roughly how long does it take to get there?", "ship"),
        ("I paid for express delivery but order {order} is taking the standard {days} days.", None),
        ("Only one box of my {product} order showed up, the other parcel is still listed as in transit.", "ship"),
        ("Could you hold my parcel at the {carrier} depot? Nobody will be home on {date}.", None),
        ("The label on my package had the wrong house number and {carrier} sent it back to your warehouse.", None),
        ("Is there any way to get the {product} to me faster? I need it before {date}.", "ship"),
        ("Order {order} has said out for delivery for three days now and still nothing.", None),
        ("Can you send the {product} now and the rest of my order later when it's in stock?", "ship"),
        ("I got an email saying my order was dispatched but there is no tracking link in it.", None),
        ("My preorder {order} for the {product} still hasn't left the warehouse, when will it go out?", "ship"),
        ("The tracking number you gave me for order {order} doesn't work on the {carrier} website.", None),
        ("Does the {product} come with signature on delivery? I work days and can't be there to receive it.", "ship"),
        ("Why is shipping to {city} taking so long? Order {order} left your warehouse on {date}.", None),
        ("It's been {days} days and my {product} is apparently stuck at customs in {country}.", "ship"),
    ],
    "technical": [
        ("My {product} won't turn on anymore, the light blinks red {count} times and then nothing.", "power"),
        ("The {product} app crashes every single time I open the settings page.", "app"),
        ("I keep getting error {error} when I try to sync the {product}.", "app"),
        ("Since the last update my {product} drops off the wifi every few minutes.", "power"),
        ("The {product} makes a loud grinding noise and the display shows {error}.", "power"),
        ("Syncing in {product} stopped on {date} with error {error} and I can't work out why.", "app"),
        ("The {product} doesn't show up in the app when I try to pair it over bluetooth.", "power"),
        ("Is there a known problem with the {product} app on Android 14? It freezes on the loading screen.", "app"),
        ("My {product} flickers on and off and then goes dark after a few seconds.", "power"),
        ("I followed the setup guide twice but the {product} still won't connect, it just says {error}.", "power"),
        ("Getting {error} whenever I try to upload files bigger than 2 GB to {product}.", "app"),
        ("The {product} gets really hot after ten minutes and then shuts itself off.", "power"),
        ("Holding the reset button on my {product} does nothing, how do I do a factory reset?", "power"),
        ("The {product} firmware update has been stuck at {percent} percent for an hour.", "power"),
        ("Notifications from the {product} app stopped coming through on my phone after {date}.", "app"),
        ("Can someone technical look at my {product}? It restarts on its own every night.", "power"),
        ("The desktop client for {product} shows {error} and closes as soon as it launches.", "app"),
    ],
    "account": [
        ("I can't sign in, it says my password is wrong even right after I reset it.", None),
        ("The password reset email never arrives at {email}, I've checked the spam folder too.", None),
        ("How do I change the email address on my profile from {email} to my new work address?", None),
        ("Please delete my account and all the personal data you have stored about me.", None),
        ("My login got locked after too many attempts, can you unlock it for me?", None),
        ("I lost my phone and can't get the two-factor codes for my {product} login anymore.", "login"),
        ("I accidentally signed up twice, can you merge the two profiles so my {product} history is in one place?", "login"),
        ("Someone signed in to my profile from {city} last night and it definitely wasn't me.", None),
        ("How can I add my partner as a second user on our {product} household plan?", "login"),
        ("I got married and want to change the name on my profile, it still shows my old surname.", None),
        ("Your site says {email} is already registered but I never created anything with you.", None),
        ("Can I move my {product} login over to my new phone number? The old number is disconnected.", "login"),
        ("Please switch off all marketing emails and let me choose what data you keep about me.", None),
        ("My display name on the {product} leaderboard shows my full email, how do I hide it?", "login"),
        ("I want to hand my {product} profile over to my daughter, can the username be changed?", "login"),
        ("The verification link to activate my new {product} user expired before I clicked it.", "login"),
    ],
    "refund": [
        ("I sent the {product} back on {date} and still haven't seen the money on my card.", "ship"),
        ("The {product} arrived broken and I don't want a replacement, I just want my {amount} back.", "ship"),
        ("How long until a return is credited? I dropped the box off at {carrier} {days} days ago.", None),
        ("Please cancel order {order} and put the payment back on my original card.", None),
        ("I'd like to return the {product}, it isn't what I expected. How do I get reimbursed?", "ship"),
        ("Tracking shows you received my return on {date}, but nothing has been paid back yet.", None),
        ("Can I get my money back for the {product} plan? I forgot to cancel before it renewed.", "sub"),
        ("My {product} died after {days} days and I'd rather have the full price back than a repair.", "power"),
        ("You promised me {amount} back as compensation for the late delivery, when will it show up?", None),
        ("I returned two of the three items from order {order} but was only credited for one.", None),
        ("If I send the {product} back within 30 days, do I need the original box to get the full amount back?", "ship"),
        ("Requesting a refund for order {order}, the item looks nothing like the photos on your site.", None),
        ("I got store credit for my returned {product} but I want the {amount} back on my card instead.", "ship"),
        ("I cancelled my {product} subscription on {date}, please return the {amount} you took after that.", "sub"),
        ("The {product} isn't what I ordered and I've already posted it back, when do I get reimbursed?", "ship"),
        ("Your returns team approved my claim for order {order} two weeks ago and I'm still waiting for the money.", None),
    ],
    "feedback": [
        ("Just wanted to say the {product} is great, easily the best thing I've bought this year.", None),
        ("Your agent {agent} was incredibly patient with me yesterday, please pass on my thanks.", None),
        ("It would be nice if the {product} app had a dark mode, the white screen is harsh at night.", "app"),
        ("The {product} came wrapped in far too much plastic, please consider greener packaging.", "ship"),
        ("The new checkout page is confusing, it took me ages to find where to enter a coupon.", None),
        ("Love the latest {product} update, everything feels much faster now.", "app"),
        ("Suggestion: let customers pick a delivery time window, it would make life much easier.", None),
        ("Your phone line hold times are too long, I waited {minutes} minutes today just to ask a quick question.", None),
        ("The {product} works well but the instructions in the box were really hard to follow.", "ship"),
        ("Thanks for sorting out my return so quickly last week, really good service.", None),
        ("Five stars for the {product}, the whole family uses it every day.", None),
        ("Would love to see a cheaper student option for {product}.", "sub"),
        ("The colours of the {product} in your photos don't quite match the real thing, maybe update the site.", "ship"),
        ("Not a complaint, just a note: setting up the {product} took under five minutes, very impressive.", None),
        ("A size guide for the {product} would help a lot, I had to guess between two sizes.", "ship"),
        ("Some feedback on the {product}: the buttons feel cheap for the price, otherwise it's lovely.", "power"),
        ("I've recommended the {product} to three friends already, keep up the good work.", None),
        ("The help articles on your website are outdated and still show the old {product} screens.", "app"),
    ],
}

# Optional extra sentence that adds detail without changing the intent. Sentences
# marked "after" only make sense following the request; the rest may also precede it.
_CONTEXT: dict[str, list[tuple[str, str]]] = {
    "billing": [
        ("My bank app shows {amount} taken on {date}.", "any"),
        ("This is the second month in a row this has happened.", "after"),
        ("I need it sorted before the end of the month for my expenses.", "any"),
        ("The order number is {order} if that helps.", "any"),
        ("I've attached a screenshot of my statement.", "after"),
    ],
    "shipping": [
        ("I've been checking the {carrier} site every day.", "any"),
        ("It's a birthday present so the date really matters.", "any"),
        ("The order number is {order}.", "any"),
        ("I ordered it on {date}.", "any"),
        ("Nobody at the local depot could tell me anything.", "after"),
    ],
    "technical": [
        ("I already tried restarting it and unplugging it.", "after"),
        ("It worked fine until {date}.", "any"),
        ("I'm on the latest version as far as I can tell.", "any"),
        ("Turning it off and on again didn't help either.", "after"),
        ("The error code is {error} if that means anything to you.", "after"),
    ],
    "account": [
        ("I've been a customer since {year}.", "any"),
        ("I need to get back in today if possible.", "after"),
        ("The address I used back then was {email}.", "after"),
        ("I've tried on both my phone and my laptop.", "after"),
        ("Please confirm once it's done.", "after"),
    ],
    "refund": [
        ("The order number was {order}.", "any"),
        ("It's been more than {days} days now.", "any"),
        ("I still have the {carrier} receipt for the return.", "after"),
        ("I paid {amount} for it in total.", "after"),
        ("Honestly a bit disappointed with how long this is taking.", "after"),
    ],
    "feedback": [
        ("No need to reply.", "after"),
        ("Just thought you should know.", "after"),
        ("Keep up the good work.", "after"),
        ("Long-time customer here.", "any"),
        ("I hope this helps you improve things.", "after"),
    ],
}

_FIRST_NAMES = ("Anna", "Ben", "Carla", "Dev", "Elif", "Femi", "Grace", "Hiro", "Ines", "Jonas", "Kofi",
                "Lena", "Marco", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tomas", "Uma", "Wei")
_LAST_NAMES = ("Smith", "Okafor", "Nguyen", "Garcia", "Kowalski", "Haddad", "Larsen", "Tanaka", "Brown",
               "Rossi", "Patel", "Moreau", "Schmidt", "Silva", "Khan")
_AGENTS = ("Maria", "Tom", "Aisha", "Lukas", "Jenny", "Raj", "Sofia", "Daniel")
_CITIES = ("Leeds", "Austin", "Lyon", "Dublin", "Toronto", "Porto", "Denver", "Glasgow", "Melbourne")
_COUNTRIES = ("Canada", "Ireland", "Norway", "Australia", "Mexico", "Japan", "Portugal", "New Zealand")
_CARRIERS = ("UPS", "FedEx", "DHL", "Royal Mail", "Canada Post", "USPS")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
_EMAIL_DOMAINS = ("example.com", "mail.example.org", "example.net")

_EMAIL_OPENINGS = ("Hi,", "Hello,", "Hi there,", "Dear support team,", "Good morning,", "Hello team,", "To whom it may concern,", "")
_EMAIL_CLOSINGS = ("Thanks, {first}", "Best regards, {first} {last}", "Kind regards, {first}", "Thank you!", "Cheers, {first}", "")
_CHAT_OPENINGS = ("hi", "hey", "hello?", "Hi,", "", "", "")
_CHAT_CLOSINGS = ("thx", "thanks", "pls help", "", "", "")
_PHONE_OPENINGS = ("yeah hi, um,", "hello, so", "hi, yes, uh,", "right, so", "um hi,", "yes hello,")
_FORM_OPENINGS = ("", "", "Order reference: {order}.", "Name: {first} {last}.")
_SOCIAL_OPENINGS = ("@LarkspurHelp", "@LarkspurHelp hey", "@LarkspurHelp hi,")
_POLITE = ("Thanks in advance.", "Appreciate the help.", "Any help would be great.", "Thank you.", "")

_TYPO_RATE = 0.15
# Quick channels are often typed all in lowercase; formal ones rarely.
_LOWERCASE_RATE = {"email": 0.04, "chat": 0.4, "phone transcript": 0.1, "web form": 0.05, "social media": 0.25}


def make_demo_task(seed: int = 0, n_train: int = 2000, n_test: int = 300) -> tuple[list[dict], list[dict]]:
    """Generate the demo ticket-intent data set.

    Args:
        seed: Random seed; the same seed always gives identical output.
        n_train: Number of training records (>= 1).
        n_test: Number of test records (>= 0).

    Returns:
        ``(train, test)``: lists of records ``{"text", "label", "product", "channel"}``,
        labels from ``DEMO_LABELS`` and balanced within each split. No text appears
        twice across both splits.

    Raises:
        ValueError: If a size is out of range.
    """
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1:
        raise ValueError(f"n_train must be an integer >= 1, got {n_train!r}")
    if isinstance(n_test, bool) or not isinstance(n_test, int) or n_test < 0:
        raise ValueError(f"n_test must be an integer >= 0, got {n_test!r}")
    rng = random.Random(seed)
    seen: set[str] = set()
    train = _make_split(rng, n_train, seen)
    test = _make_split(rng, n_test, seen)
    return train, test


def _make_split(rng: random.Random, size: int, seen: set[str]) -> list[dict]:
    # Exact balance: cycle through the labels, then shuffle the order.
    labels = [DEMO_LABELS[i % len(DEMO_LABELS)] for i in range(size)]
    rng.shuffle(labels)
    records = []
    for label in labels:
        for _ in range(1000):
            record = _make_ticket(rng, label)
            # A shared `seen` set keeps every text unique, so train and test never overlap.
            if record["text"] not in seen:
                break
        else:
            raise ValueError(f"could not generate {size} distinct demo tickets; ask for fewer examples")
        seen.add(record["text"])
        records.append(record)
    return records


def _make_ticket(rng: random.Random, label: str) -> dict:
    products = list(_PRODUCTS)
    product = rng.choices(products, weights=_PRODUCT_WEIGHTS[label])[0]
    tags = _PRODUCTS[product]
    templates = [text for text, tag in _CORE[label] if tag is None or tag in tags]
    assert templates, f"no {label} template fits {product}"
    channel = rng.choices(_CHANNELS, weights=_CHANNEL_WEIGHTS)[0]
    slots = _Slots(rng, product)

    sentences = [rng.choice(templates)]
    roll = rng.random()
    if roll < 0.2:
        sentences.insert(0, rng.choice([text for text, where in _CONTEXT[label] if where == "any"]))
    elif roll < 0.5:
        sentences.append(rng.choice(_CONTEXT[label])[0])
    text = _STYLERS[channel](rng, [slots.fill(s) for s in sentences], slots)
    if rng.random() < _LOWERCASE_RATE[channel]:
        text = text.lower()
    if rng.random() < _TYPO_RATE:
        text = _add_typo(rng, text)
    return {"text": text, "label": label, "product": product, "channel": channel}


class _Slots:
    """Fills template placeholders; one customer and order per ticket so details agree."""

    def __init__(self, rng: random.Random, product: str) -> None:
        self.rng = rng
        self.values = {
            "product": product,
            "first": rng.choice(_FIRST_NAMES),
            "last": rng.choice(_LAST_NAMES),
            "order": rng.choice(("#{}", "{}", "LS-{}", "no. {}")).format(rng.randint(100000, 9999999)),
            "last4": f"{rng.randint(0, 9999):04d}",
            "agent": rng.choice(_AGENTS),
            "city": rng.choice(_CITIES),
            "country": rng.choice(_COUNTRIES),
            "carrier": rng.choice(_CARRIERS),
            "month": rng.choice(_MONTHS),
            "year": str(rng.randint(2012, 2023)),
            "days": str(rng.randint(3, 21)),
            "count": rng.choice(("two", "three", "four", "5")),
            "minutes": str(rng.randint(15, 75)),
            "percent": str(rng.randint(12, 97)),
            "error": rng.choice(("E-{}", "ERR_{}", "code {}", "0x{}")).format(rng.randint(100, 9999)),
        }
        self.values["email"] = "{}.{}@{}".format(
            self.values["first"].lower(), self.values["last"].lower(), rng.choice(_EMAIL_DOMAINS)
        )
        price = rng.randint(9, 399)
        cents = rng.choice(("99", "00", "49", "95"))
        self.values["amount"] = f"${price}.{cents}"
        self.values["amount2"] = f"${max(5, price - rng.randint(3, 60))}.{cents}"
        self.values["date"] = self._date()

    def _date(self) -> str:
        style = self.rng.randrange(4)
        if style == 0:
            return f"{self.rng.choice(_MONTHS)} {self.rng.randint(1, 28)}"
        if style == 1:
            return f"{self.rng.randint(1, 12)}/{self.rng.randint(1, 28)}"
        if style == 2:
            return self.rng.choice(_WEEKDAYS)
        return f"the {_ordinal(self.rng.randint(1, 28))}"

    def fill(self, template: str) -> str:
        return template.format(**self.values)


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _join(*parts: str) -> str:
    return " ".join(part for part in parts if part)


def _after_greeting(opening: str, sentences: list[str]) -> list[str]:
    # "Hi, the order ..." reads naturally; "Hi, The order ..." does not. "I" stays capital.
    if opening:
        sentences = [_lower_first(sentences[0]), *sentences[1:]]
    return sentences


def _lower_first(sentence: str) -> str:
    if sentence.split(" ")[0] in ("I", "I'm", "I've", "I'd", "I'll"):
        return sentence
    return sentence[0].lower() + sentence[1:]


def _style_email(rng: random.Random, sentences: list[str], slots: _Slots) -> str:
    opening = rng.choice(_EMAIL_OPENINGS)
    closing = slots.fill(rng.choice(_EMAIL_CLOSINGS))
    # A polite line before a closing that already thanks the reader would read twice.
    polite = rng.choice(_POLITE) if rng.random() < 0.3 and "Thank" not in closing else ""
    return _join(opening, *_after_greeting(opening, sentences), polite, closing)


def _style_chat(rng: random.Random, sentences: list[str], slots: _Slots) -> str:
    opening = rng.choice(_CHAT_OPENINGS)
    text = _join(opening, *_after_greeting(opening, sentences), rng.choice(_CHAT_CLOSINGS))
    # Chat messages are often typed quickly: no final full stop.
    return text.rstrip(".") if rng.random() < 0.4 else text


def _style_phone(rng: random.Random, sentences: list[str], slots: _Slots) -> str:
    # Transcripts start mid-breath and pick up fillers between sentences.
    spoken = [_lower_first(sentences[0])]
    for sentence in sentences[1:]:
        filler = rng.choice(("and", "uh,", "so", "also", ""))
        spoken.append(_join(filler, _lower_first(sentence) if filler else sentence))
    return _join(rng.choice(_PHONE_OPENINGS), *spoken)


def _style_form(rng: random.Random, sentences: list[str], slots: _Slots) -> str:
    return _join(slots.fill(rng.choice(_FORM_OPENINGS)), *sentences)


def _style_social(rng: random.Random, sentences: list[str], slots: _Slots) -> str:
    opening = rng.choice(_SOCIAL_OPENINGS)
    return _join(opening, *_after_greeting(opening, sentences))


_STYLERS: dict[str, Callable[[random.Random, list[str], _Slots], str]] = {
    "email": _style_email,
    "chat": _style_chat,
    "phone transcript": _style_phone,
    "web form": _style_form,
    "social media": _style_social,
}


def _add_typo(rng: random.Random, text: str) -> str:
    words = text.split(" ")
    candidates = [i for i, word in enumerate(words) if len(word) >= 5 and word.isalpha()]
    if not candidates:
        return text
    i = rng.choice(candidates)
    word = words[i]
    j = rng.randrange(1, len(word) - 1)
    kind = rng.randrange(3)
    if kind == 0:  # swapped neighbours
        word = word[:j] + word[j + 1] + word[j] + word[j + 2:]
    elif kind == 1:  # dropped letter
        word = word[:j] + word[j + 1:]
    else:  # doubled letter
        word = word[:j] + word[j] + word[j:]
    words[i] = word
    return " ".join(words)
