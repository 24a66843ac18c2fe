"""`finance-headlines`: synthetic financial news headlines, each labelled with one of 13
event types, in the spirit of the paper's FinHeadlineMix (synthetic too). Companies,
tickers, analysts and products are invented."""

from __future__ import annotations

import random
from collections.abc import Mapping

from models.tasks.synthetic import SyntheticTask

TEMPLATES: dict[str, tuple[str, ...]] = {
    "earnings beat": (
        "{co} tops Q{q} estimates as EPS hits {eps} vs {est} expected",
        "{co} ({tk}) quarterly profit beats forecasts on strong {segment} demand",
        "{tk} shares jump {pct} after earnings come in ahead of Street views",
        "{co} posts better-than-expected Q{q} results, revenue {rev}",
        "{co} Q{q} earnings surprise to the upside; net income rises {pct}",
        "Strong {segment} sales lift {co} profit above analyst expectations",
        "{co} reports record quarterly earnings, beating consensus by {cents} cents",
        "{co} smashes profit forecasts for fiscal {year}",
        "{tk} earnings beat: adjusted EPS {eps}, consensus {est}",
        "{co} quarterly revenue of {rev} beats estimates of {rev2}",
    ),
    "earnings miss": (
        "{co} misses Q{q} profit estimates, EPS {est} vs {eps} expected",
        "{co} ({tk}) quarterly results fall short as {segment} sales slump",
        "{tk} slides {pct} after earnings disappoint",
        "{co} posts weaker-than-expected Q{q} profit on rising costs",
        "{co} revenue of {rev} misses forecasts of {rev2}",
        "Soft {segment} demand drags {co} earnings below consensus",
        "{co} swings to a surprise quarterly loss",
        "{co} profit falls {pct}, missing analyst views for fiscal {year}",
        "{tk} earnings miss: adjusted EPS {est}, Street saw {eps}",
        "{co} Q{q} net income trails expectations by {cents} cents a share",
    ),
    "guidance raised": (
        "{co} raises full-year outlook on robust {segment} demand",
        "{co} lifts fiscal {year} revenue forecast to {rev}",
        "{tk} boosts annual guidance; sees EPS of {eps}",
        "{co} ups its {year} profit forecast after a strong first half",
        "{co} now expects sales growth of {pct}, up from earlier view",
        "{co} hikes outlook as orders accelerate",
        "{co} increases full-year margin target citing cost savings",
        "{co} ({tk}) raises {year} forecast for the second time this year",
        "Upbeat {co} lifts guidance, shares rise {pct} premarket",
    ),
    "guidance cut": (
        "{co} cuts full-year outlook as {segment} demand weakens",
        "{co} lowers fiscal {year} revenue forecast to {rev}",
        "{tk} slashes annual guidance; now sees EPS of {est}",
        "{co} trims {year} profit forecast on higher input costs",
        "{co} now expects sales to fall {pct}, reversing earlier view",
        "{co} warns on profits, shares sink {pct}",
        "{co} reduces full-year margin target citing weak pricing",
        "{co} ({tk}) lowers {year} forecast for the second time this year",
        "Gloomy {co} pares guidance amid slowing orders",
    ),
    "merger or acquisition": (
        "{co} to acquire {other} in {amount} deal",
        "{co} agrees to buy {other} for {price} per share in cash",
        "{other} to merge with {co} in all-stock transaction",
        "{tk} announces takeover of rival {other}",
        "{co} completes purchase of {other}'s {segment} unit for {amount}",
        "{co} and {other} agree to combine in {amount} merger",
        "{co} wins bidding war for {other}",
        "{co} snaps up {segment} startup {other}",
        "Deal: {co} buys {other} for {amount} including debt",
    ),
    "layoffs": (
        "{co} to cut {jobs} jobs in restructuring",
        "{co} lays off {pct} of its workforce",
        "{tk} announces {jobs} job cuts as it trims costs",
        "{co} plans to eliminate {jobs} positions in its {segment} division",
        "{co} sheds {jobs} staff amid slowdown",
        "{co} to close {plants} plants, affecting {jobs} workers",
        "Job cuts at {co}: {jobs} roles to go by {year}",
        "{co} announces second round of layoffs this year",
        "{co} reduces headcount by {jobs} to save {amount} annually",
    ),
    "analyst upgrade": (
        "{firm} upgrades {co} to buy, target {price}",
        "{co} ({tk}) raised to outperform at {firm}",
        "{firm} lifts {tk} to overweight from neutral",
        "{co} upgraded at {firm} on improving {segment} outlook",
        "{firm} turns bullish on {co}, sees {pct} upside",
        "{tk} gets upgrade to strong buy from {firm}",
        "{firm} moves {co} to buy from hold, price target {price}",
        "Upgrade: {firm} says {co} shares are undervalued",
        "{co} rating raised by {firm} citing margin recovery",
    ),
    "analyst downgrade": (
        "{firm} downgrades {co} to sell, target {price}",
        "{co} ({tk}) cut to underperform at {firm}",
        "{firm} lowers {tk} to underweight from neutral",
        "{co} downgraded at {firm} on weakening {segment} outlook",
        "{firm} turns bearish on {co}, sees {pct} downside",
        "{tk} gets downgrade to hold from {firm}",
        "{firm} moves {co} to sell from buy, price target {price}",
        "Downgrade: {firm} says {co} shares are overvalued",
        "{co} rating lowered by {firm} citing margin pressure",
    ),
    "dividend change": (
        "{co} raises quarterly dividend to {div} a share",
        "{co} cuts its dividend by {pct} to preserve cash",
        "{tk} boosts payout {pct}, declares {div} dividend",
        "{co} suspends dividend amid {segment} downturn",
        "{co} hikes dividend for {n} consecutive year",
        "{co} slashes quarterly payout to {div}",
        "{co} declares special dividend of {div} per share",
        "{co} ({tk}) reinstates its dividend at {div}",
        "{co} lifts annual dividend to {div2} a share",
    ),
    "share buyback": (
        "{co} announces {amount} share buyback",
        "{co} authorizes repurchase of up to {amount} of its stock",
        "{tk} launches new {amount} stock repurchase program",
        "{co} to buy back {pct} of its shares",
        "{co} expands buyback plan by {amount}",
        "{co} board approves accelerated share repurchase",
        "{co} ({tk}) completes {amount} buyback, plans another",
        "{co} will return {amount} to shareholders through repurchases",
        "Buyback: {co} to retire {shares} million shares",
    ),
    "regulatory action": (
        "{agency} fines {co} {amount} over {issue}",
        "{co} faces {agency} probe into {issue}",
        "{agency} sues {co} alleging {issue}",
        "{co} ({tk}) settles {agency} charges for {amount}",
        "Court rules against {co} in {issue} case",
        "{agency} opens antitrust investigation into {co}",
        "{co} hit with class-action lawsuit over {issue}",
        "{agency} orders {co} to halt {segment} sales pending review",
        "{co} agrees to pay {amount} to resolve {issue} claims",
    ),
    "executive change": (
        "{co} names {person} as new {title}",
        "{co} {title} {person} to step down",
        "{tk} appoints {person} {title}, effective immediately",
        "{co} {title} resigns; {person} named interim replacement",
        "{co} ousts {title} after board review",
        "{person} to succeed {person2} as {co} {title}",
        "{co} hires former {other} executive {person} as {title}",
        "{co} ({tk}) announces {title} succession plan",
        "Leadership shake-up at {co} as {title} {person} departs",
    ),
    "product launch": (
        "{co} unveils {product}, its new {segment} offering",
        "{co} launches {product} in {n} markets",
        "{tk} rolls out {product} to challenge {other}",
        "{co} introduces {product} priced at {price}",
        "{co} debuts next-generation {product}",
        "{co} ({tk}) begins shipping {product} ahead of schedule",
        "{co} releases {product} for {segment} customers",
        "{co} takes the wraps off {product} at annual event",
        "New from {co}: {product} goes on sale {month}",
    ),
}

_STEMS = (
    "Norcliff", "Veltra", "Brightwater", "Kestrel", "Orinex", "Halvard", "Sunmere", "Tavora",
    "Quillon", "Redgate", "Marlow", "Corvane", "Eastwell", "Pinebrook", "Silvan", "Ardent",
    "Lumora", "Greyhaven", "Northway", "Calder", "Delmont", "Everly", "Fenwick", "Granite Peak",
    "Hollis", "Ironvale", "Juniper", "Kingsford", "Larkspur", "Meridian", "Nexora", "Oakhurst",
    "Prismatic", "Quarry", "Rowan", "Stellan", "Thornbury", "Umbra", "Vantor", "Westmark",
    "Yarrow", "Zephyr", "Altamira", "Bexley", "Cobalt", "Drayton", "Elmstead", "Foxglove",
    "Gallant", "Harbinger", "Islay", "Jarrah", "Kinross", "Lindqvist", "Monarch", "Nettle",
    "Ostrava", "Palisade", "Rosmund", "Sable",
)  # fmt: skip
_KINDS = (
    "Energy", "Holdings", "Systems", "Pharma", "Motors", "Foods", "Bank", "Logistics",
    "Semiconductor", "Retail", "Airlines", "Telecom", "Mining", "Software", "Insurance",
)  # fmt: skip
RIVALS = (  # counterparties: never a subject company, so no split leaks a subject's name
    "Acton Labs", "Birchfield Co", "Crestline Group", "Dunmore AG", "Ember Works",
    "Fairhaven Ltd", "Glenrock Inc", "Hartwell SA", "Inverness Corp", "Jadeport Ltd",
)  # fmt: skip
SEGMENTS = (
    "cloud", "retail", "auto", "chip", "advertising", "consumer", "data center", "wholesale",
    "pharmacy", "freight", "subscription", "industrial", "gaming", "wireless", "mortgage",
)  # fmt: skip
FIRMS = (
    "Harlow Partners", "Beckett Securities", "Morland Capital", "Stanway Research",
    "Corbin & Pike", "Ellison Grant", "Tidewater Markets", "Ashdown Equity",
)  # fmt: skip
AGENCIES = ("SEC", "FTC", "EU Commission", "DOJ", "FDA", "CFPB", "state regulators")
ISSUES = (
    "misleading disclosures", "price fixing", "data privacy", "accounting irregularities",
    "product safety", "unfair lending", "emissions reporting", "patent infringement",
)  # fmt: skip
TITLES = ("CEO", "CFO", "chief executive", "chairman", "COO", "president", "finance chief")
FIRST = ("Ana", "Marcus", "Priya", "Tom", "Lena", "David", "Grace", "Omar", "Sofia", "Ken")
LAST = ("Okafor", "Lindgren", "Haddad", "Moreau", "Takeda", "Brennan", "Castillo", "Novak")
PRODUCT = ("X", "Pro", "One", "Max", "Edge", "Pulse", "Nova", "Flex", "Air", "Prime")
MONTHS = ("in March", "next month", "this fall", "in June", "on Friday", "in January")
SOURCES = ("UPDATE 1-", "BRIEF-", "(Reuters) - ", "BREAKING: ", "Exclusive: ", "")


def companies() -> list[dict[str, str]]:
    """60 invented companies with tickers, in a fixed order (the split deal uses it)."""
    rows = []
    for i, stem in enumerate(_STEMS):
        kind = _KINDS[(i * 7) % len(_KINDS)]
        letters = "".join(w[0] for w in stem.split()) + stem.replace(" ", "")[1:3] + kind[0]
        rows.append({"co": f"{stem} {kind}", "tk": letters.upper()[:4]})
    return rows


def _money(rng: random.Random, low: float, high: float) -> str:
    value = rng.uniform(low, high)
    if rng.random() < 0.5:
        return f"${value:.1f}B" if value < 100 else f"${value:.0f}M"
    return f"{value:.1f} billion dollars" if value < 100 else f"${value:.0f} million"


def fill(rng: random.Random, entity: Mapping[str, str]) -> dict[str, str]:
    eps, gap = rng.uniform(0.2, 4.5), rng.uniform(0.02, 0.4)
    other = rng.choice(RIVALS)
    div = rng.uniform(0.05, 2.5)
    return {
        **entity,
        "q": str(rng.randint(1, 4)),
        "year": str(rng.randint(2024, 2027)),
        "eps": f"${eps + gap:.2f}",
        "est": f"${eps:.2f}",
        "cents": str(int(gap * 100)),
        "rev": _money(rng, 0.4, 60),
        "rev2": _money(rng, 0.4, 60),
        "pct": f"{rng.uniform(1, 35):.0f}%" if rng.random() < 0.7 else f"{rng.uniform(1, 35):.1f}%",
        "segment": rng.choice(SEGMENTS),
        "other": other,
        "amount": _money(rng, 0.2, 900),
        "price": f"${rng.uniform(8, 450):.0f}",
        "jobs": f"{rng.choice([120, 350, 800, 1200, 2500, 4000, 9000]):,}",
        "plants": str(rng.randint(2, 9)),
        "firm": rng.choice(FIRMS),
        "div": f"${div:.2f}",
        "div2": f"${div * 4:.2f}",
        "n": rng.choice(["3rd", "10th", "25th", "12"]),
        "shares": str(rng.randint(5, 200)),
        "agency": rng.choice(AGENCIES),
        "issue": rng.choice(ISSUES),
        "title": rng.choice(TITLES),
        "person": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
        "person2": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
        "product": f"{entity['co'].split()[0]} {rng.choice(PRODUCT)}",
        "month": rng.choice(MONTHS),
    }


def noise(rng: random.Random, text: str) -> str:
    text = rng.choice(SOURCES) + text if rng.random() < 0.35 else text
    if rng.random() < 0.15:
        text += rng.choice([" - sources", " -report", "; shares halted", " (corrected)"])
    if rng.random() < 0.1:
        text = text.upper()
    elif rng.random() < 0.1:
        text = text.lower()
    return text


def finance_headlines() -> SyntheticTask:
    return SyntheticTask(
        name="finance-headlines",
        description="financial news headline -> one of 13 event types (synthetic)",
        instruction="Classify the event in this financial headline.",
        field="Headline",
        templates=TEMPLATES,
        entities=companies(),
        fill=fill,
        noise=noise,
    )
