"""A small inventory ledger: items, stock movements and reports."""

import csv
import datetime as dt
from dataclasses import dataclass, field


@dataclass
class Item:
    sku: str
    name: str
    unit_price: float
    reorder_level: int = 10
    tags: list = field(default_factory=list)

    def label(self):
        return f"{self.sku} {self.name}"


@dataclass
class Movement:
    sku: str
    quantity: int
    reason: str
    when: dt.datetime


class Ledger:
    def __init__(self):
        self.items = {}
        self.movements = []

    def add_item(self, item):
        if item.sku in self.items:
            raise ValueError(f"duplicate sku {item.sku}")
        self.items[item.sku] = item

    def remove_item(self, sku):
        if self.stock_of(sku) != 0:
            raise ValueError(f"{sku} still has stock")
        del self.items[sku]

    def record(self, sku, quantity, reason, when=None):
        if sku not in self.items:
            raise KeyError(sku)
        when = when or dt.datetime.now()
        self.movements.append(Movement(sku, quantity, reason, when))

    def receive(self, sku, quantity, when=None):
        if quantity <= 0:
            raise ValueError("received quantity must be positive")
        self.record(sku, quantity, "receive", when)

    def ship(self, sku, quantity, when=None):
        if quantity <= 0:
            raise ValueError("shipped quantity must be positive")
        if self.stock_of(sku) < quantity:
            raise ValueError(f"not enough {sku} in stock")
        self.record(sku, -quantity, "ship", when)

    def adjust(self, sku, quantity, when=None):
        self.record(sku, quantity, "adjust", when)

    def stock_of(self, sku):
        return sum(m.quantity for m in self.movements if m.sku == sku)

    def stock(self):
        levels = {sku: 0 for sku in self.items}
        for m in self.movements:
            levels[m.sku] = levels.get(m.sku, 0) + m.quantity
        return levels

    def value_of(self, sku):
        item = self.items[sku]
        return self.stock_of(sku) * item.unit_price

    def total_value(self):
        return sum(self.value_of(sku) for sku in self.items)

    def below_reorder_level(self):
        levels = self.stock()
        return [
            self.items[sku]
            for sku, level in sorted(levels.items())
            if level < self.items[sku].reorder_level
        ]

    def movements_between(self, start, end):
        return [m for m in self.movements if start <= m.when < end]

    def shipped_between(self, start, end):
        totals = {}
        for m in self.movements_between(start, end):
            if m.reason == "ship":
                totals[m.sku] = totals.get(m.sku, 0) - m.quantity
        return totals

    def received_between(self, start, end):
        totals = {}
        for m in self.movements_between(start, end):
            if m.reason == "receive":
                totals[m.sku] = totals.get(m.sku, 0) + m.quantity
        return totals

    def tagged(self, tag):
        return [item for item in self.items.values() if tag in item.tags]


def parse_line(row):
    sku, name, price, level = row[:4]
    tags = row[4].split(";") if len(row) > 4 and row[4] else []
    return Item(sku.strip(), name.strip(), float(price), int(level), tags)


def load_items(path):
    items = []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader, None)
        for row in reader:
            if not row or row[0].startswith("#"):
                continue
            items.append(parse_line(row))
    return items


def save_items(path, items):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sku", "name", "unit_price", "reorder_level", "tags"])
        for item in items:
            writer.writerow(
                [item.sku, item.name, item.unit_price, item.reorder_level, ";".join(item.tags)]
            )


def load_movements(path, ledger):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader, None)
        for sku, quantity, reason, when in reader:
            ledger.record(sku, int(quantity), reason, dt.datetime.fromisoformat(when))


def save_movements(path, ledger):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sku", "quantity", "reason", "when"])
        for m in ledger.movements:
            writer.writerow([m.sku, m.quantity, m.reason, m.when.isoformat()])


def format_money(amount):
    return f"{amount:,.2f}"


def stock_report(ledger):
    lines = ["sku        name                 stock      value"]
    for sku, level in sorted(ledger.stock().items()):
        item = ledger.items[sku]
        value = format_money(level * item.unit_price)
        lines.append(f"{sku:<10} {item.name:<20} {level:>5} {value:>10}")
    lines.append(f"total value {format_money(ledger.total_value())}")
    return "\n".join(lines)


def reorder_report(ledger):
    lines = []
    for item in ledger.below_reorder_level():
        missing = item.reorder_level - ledger.stock_of(item.sku)
        lines.append(f"reorder {missing} x {item.label()}")
    return "\n".join(lines) or "nothing to reorder"


def weekly_summary(ledger, week_start):
    week_end = week_start + dt.timedelta(days=7)
    shipped = ledger.shipped_between(week_start, week_end)
    received = ledger.received_between(week_start, week_end)
    skus = sorted(set(shipped) | set(received))
    lines = [f"week of {week_start.date().isoformat()}"]
    for sku in skus:
        lines.append(f"{sku}: shipped {shipped.get(sku, 0)}, received {received.get(sku, 0)}")
    return "\n".join(lines)


def main(items_path, movements_path):
    ledger = Ledger()
    for item in load_items(items_path):
        ledger.add_item(item)
    load_movements(movements_path, ledger)
    print(stock_report(ledger))
    print()
    print(reorder_report(ledger))


if __name__ == "__main__":
    import sys

    main(sys.argv[1], sys.argv[2])
