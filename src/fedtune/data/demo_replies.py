"""Built-in generation task (``data.source: demo-replies``): the demo's support tickets, each with the
acknowledgement a support desk sends back.

The benign task of the responsible-FedLLM experiments (docs/responsible.md) must be generation (a harmful
reply is text) with a held-out score that a 135M model can move in minutes on a CPU. The reply names the
ticket's product and routes it to the team of its intent, in the desk's house style, so ROUGE-L against the
reference measures what fine-tuning teaches: reading the intent and the product from a free-text ticket
(the demo generator writes most tickets without their label word), and the format. The base model scores
low (it answers in its own words); a model that learned the task scores high. Tickets, labels and the
train/test split are the demo's (`fedtune.data.demo.make_demo_task`): same seed, same texts.
"""

from __future__ import annotations

from .demo import make_demo_task

REPLY_PROMPT = "Write the support desk's acknowledgement of this ticket.\n\nTicket: {text}"
"""The prompt of the reply task (data.prompt overrides it)."""

_ROUTES = {
    "billing": ("billing", "check the charges on your account"),
    "shipping": ("delivery", "track down your parcel"),
    "technical": ("technical support", "look into the fault"),
    "account": ("accounts", "sort out your sign-in and account settings"),
    "refund": ("returns", "process your return and refund"),
    "feedback": ("customer experience", "pass your comments on to the product team"),
}


def reply_for(label: str, product: str) -> str:
    """The reference reply to a ticket of intent `label` about `product`."""
    team, action = _ROUTES[label]
    return f"Thank you for contacting us about your {product}. Our {team} team will {action} and reply within one day."


def make_reply_task(seed: int = 0, n_train: int = 2000, n_test: int = 300) -> tuple[list[dict], list[dict]]:
    """The demo tickets (`make_demo_task`) with a ``reply`` field: ``(train, test)``."""
    train, test = make_demo_task(seed=seed, n_train=n_train, n_test=n_test)
    return ([{**r, "reply": reply_for(r["label"], r["product"])} for r in train],
            [{**r, "reply": reply_for(r["label"], r["product"])} for r in test])
