"""`support-tickets`: synthetic customer-support messages, each labelled with one of 11
intents; the second domain, used to test a shift in traffic. Products are invented."""

from __future__ import annotations

import random
from collections.abc import Mapping

from models.tasks.synthetic import SyntheticTask

TEMPLATES: dict[str, tuple[str, ...]] = {
    "refund request": (
        "I want my money back for the {product} I bought last week",
        "Please refund order {order}, the {product} was not what I expected",
        "How do I get a refund for my {product}? I returned it {days} days ago",
        "Still waiting on the refund for {order}, it has been {days} days",
        "Can I get a full refund on the {product}? I never used it",
        "I returned the {product} and want the {amount} credited back to my card",
        "Requesting reimbursement for {order}, item arrived too late to be useful",
        "refund pls for the {product}, changed my mind",
    ),
    "order status": (
        "Where is my order {order}? It was supposed to arrive {day}",
        "Can you tell me when my {product} will ship?",
        "Tracking for {order} has not updated in {days} days",
        "Has my {product} been dispatched yet?",
        "What's the delivery estimate for order {order}?",
        "My package with the {product} still says processing, any update?",
        "I ordered a {product} on {day} and have heard nothing since",
        "is order {order} on its way?",
    ),
    "cancel subscription": (
        "Please cancel my {plan} subscription before the next billing date",
        "How do I stop my {plan} plan from renewing?",
        "I want to end my membership, effective {day}",
        "Cancel the {plan} subscription on account {email}",
        "I no longer need {service}, please cancel it",
        "Stop auto-renewal for my {service} subscription",
        "unsubscribe me from the {plan} plan, thanks",
        "I'd like to terminate my {service} membership today",
    ),
    "password reset": (
        "I forgot my password and can't log in to {service}",
        "The password reset link you sent to {email} has expired",
        "How do I change my password? I'm locked out",
        "I never receive the reset email for my {service} account",
        "My account {email} is locked after too many login attempts",
        "Need help resetting my login credentials for {service}",
        "cant sign in, password not working, please reset",
        "Reset my password please, the old one was compromised",
    ),
    "billing error": (
        "I was charged twice for {order}",
        "My invoice shows {amount} but the {plan} plan costs less",
        "There's a charge of {amount} on my card that I don't recognise",
        "You billed me for {service} after I cancelled it",
        "Why was I charged {amount} this month? That's wrong",
        "The discount code was not applied to my bill for {order}",
        "Double charge on my statement from {day}, please fix",
        "overcharged on my last invoice by {amount}",
    ),
    "address change": (
        "I need to change the shipping address for order {order}",
        "Please update my delivery address to {address}",
        "I moved, can you send the {product} to {address} instead?",
        "Wrong address on order {order}, it should be {address}",
        "How do I edit my shipping address before the {product} ships?",
        "Change the delivery location for my next {plan} box to {address}",
        "new address: {address}. please update my account {email}",
        "Can the courier deliver {order} to my office at {address}?",
    ),
    "product defect": (
        "The {product} I received is broken",
        "My {product} stopped working after {days} days",
        "The screen on my {product} is cracked out of the box",
        "The {product} arrived damaged, the box was crushed",
        "One of the parts of my {product} is missing",
        "My {product} overheats and smells like burning",
        "the {product} makes a loud grinding noise, defective?",
        "Faulty {product}: battery won't hold a charge",
    ),
    "technical issue": (
        "The {service} app keeps crashing when I open it",
        "I get error {code} every time I try to upload a file",
        "The website won't load on my phone since the update",
        "{service} is very slow today, pages time out",
        "My {product} won't connect to wifi after the firmware update",
        "Sync between the {service} app and my laptop is not working",
        "getting error {code} on checkout, cant pay",
        "The {service} dashboard shows a blank page",
    ),
    "account deletion": (
        "Please delete my account {email} and all my data",
        "How do I permanently close my {service} account?",
        "I want you to erase my personal information under GDPR",
        "Remove my profile and stop emailing {email}",
        "Delete everything you have about me, account {email}",
        "I'd like my {service} account deactivated for good",
        "close my account and wipe my data please",
        "Request to delete my customer record and order history",
    ),
    "upgrade plan": (
        "I want to upgrade from {plan} to the premium tier",
        "How much to move my {service} account to the business plan?",
        "Can I switch to the annual {plan} plan with more storage?",
        "Please upgrade my subscription, I need more seats",
        "What do I get if I upgrade my {plan} plan?",
        "Add the pro features to my {service} account",
        "upgrade me to family plan starting {day}",
        "I'd like to move up to a higher tier of {service}",
    ),
    "complaint": (
        "Your support agent was rude to me on the phone yesterday",
        "I'm very unhappy with the service I got for order {order}",
        "This is the third time I've had to contact you, unacceptable",
        "Terrible experience with {service}, I expected much better",
        "Nobody answered my emails for {days} days, this is poor service",
        "I'm disappointed with how my issue with the {product} was handled",
        "worst customer service ever, still no answer",
        "I want to file a formal complaint about your delivery driver",
    ),
}

_NAMES = (
    "Aerobrew", "Bloomcast", "Cinderlite", "Dashwell", "Echofit", "Fernly", "Glowpath",
    "Hushbox", "Inkwise", "Jetkettle", "Kindleaf", "Loomly", "Mistral", "Nimbuspad",
    "Orbitgo", "Pebblecam", "Quietstep", "Ripplehome", "Snugcloud", "Tidewave", "Uplinkr",
    "Vividesk", "Wanderbag", "Xylocharge", "Yonderlamp", "Zestpress", "Arclight", "Brisket",
    "Cloudnest", "Driftline", "Emberglow", "Flickbox", "Gustpro", "Halo", "Ivywall",
    "Juniperbox", "Kelpie", "Lumen", "Moxie", "Northstar", "Oasis", "Pixelpal",
)  # fmt: skip
_THINGS = (
    "blender", "speaker", "lamp", "headphones", "smartwatch", "coffee maker", "router",
    "backpack", "camera", "tablet", "vacuum", "air purifier", "keyboard", "charger",
)  # fmt: skip
PLANS = ("basic", "monthly", "starter", "plus", "standard", "student")
DAYS = ("Monday", "yesterday", "last Friday", "the 12th", "March 3", "two days ago")
STREETS = ("Elm Street", "Harbor Road", "Maple Avenue", "King's Lane", "Station Road")
GREETINGS = ("Hi, ", "Hello, ", "Hey there. ", "Good morning, ", "Dear support, ", "")
SIGNOFFS = (" Thanks.", " Thank you!", " Regards, Sam", " ASAP please.", "")


def products() -> list[dict[str, str]]:
    """42 invented brands, each with a product and a service, in a fixed order."""
    return [
        {"product": f"{name} {_THINGS[i % len(_THINGS)]}", "service": f"{name} Plus"}
        for i, name in enumerate(_NAMES)
    ]


def fill(rng: random.Random, entity: Mapping[str, str]) -> dict[str, str]:
    user = rng.choice(("sam", "j.doe", "maria88", "kchen", "alex.b", "nora"))
    return {
        **entity,
        "order": f"#{rng.choice('ABCDK')}-{rng.randint(10000, 99999)}",
        "days": str(rng.randint(2, 30)),
        "day": rng.choice(DAYS),
        "amount": f"${rng.uniform(5, 400):.2f}",
        "plan": rng.choice(PLANS),
        "email": f"{user}@{rng.choice(('mail.com', 'example.org', 'inbox.net'))}",
        "address": f"{rng.randint(1, 250)} {rng.choice(STREETS)}",
        "code": f"{rng.choice(('E', 'ERR-', '0x'))}{rng.randint(100, 999)}",
    }


def _typo(rng: random.Random, text: str) -> str:
    i = rng.randrange(1, max(2, len(text) - 1))
    return text[: i - 1] + text[i] + text[i - 1] + text[i + 1 :]


def noise(rng: random.Random, text: str) -> str:
    text = rng.choice(GREETINGS) + text + rng.choice(SIGNOFFS) if rng.random() < 0.5 else text
    if rng.random() < 0.15:
        text = _typo(rng, text)
    if rng.random() < 0.08:
        text = text.lower()
    return text


def support_tickets() -> SyntheticTask:
    return SyntheticTask(
        name="support-tickets",
        description="customer-support message -> one of 11 intents (synthetic)",
        instruction="Classify the intent of this support message.",
        field="Message",
        templates=TEMPLATES,
        entities=products(),
        fill=fill,
        noise=noise,
    )
