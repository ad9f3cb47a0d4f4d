import pytest

from fleet.models import Device
from fleet.selector import Requirement, SelectorError, compile_selector, parse_selector
from tests.factories import make_device, make_site


def test_parses_every_requirement_form():
    reqs = parse_selector("site=plant-7, tier in (1,2),!canary,env!=lab,gpu,zone==a,x notin (b, c)")
    assert reqs == [
        Requirement("site", "=", ("plant-7",)),
        Requirement("tier", "in", ("1", "2")),
        Requirement("canary", "!exists"),
        Requirement("env", "!=", ("lab",)),
        Requirement("gpu", "exists"),
        Requirement("zone", "=", ("a",)),
        Requirement("x", "notin", ("b", "c")),
    ]


def test_empty_selector_selects_everything():
    assert parse_selector("   ") == []


@pytest.mark.parametrize(
    ("text", "column", "fragment"),
    [
        ("env=", None, None),  # valid: empty value
        ("env=lab,", 8, "trailing ','"),
        ("env lab", 5, "expected '=', '!=', 'in'"),
        ("tier in 1,2", 9, "expected '('"),
        ("tier in (1,2", 13, "expected ',' or ')'"),
        ("env=la$b", 7, "unexpected character '$'"),
        ("!", 2, "expected a label key after '!'"),
        ("-bad=x", 1, "invalid label key"),
        ("env=-x", 5, "invalid label value"),
        ("a=b c=d", 5, "expected ',' between requirements"),
    ],
)
def test_bad_selectors_point_at_the_error(text, column, fragment):
    if fragment is None:
        parse_selector(text)
        return
    with pytest.raises(SelectorError) as err:
        parse_selector(text)
    assert fragment in str(err.value)
    assert err.value.position + 1 == column
    assert err.value.pretty().splitlines()[-1].index("^") - 2 == err.value.position


@pytest.mark.django_db
def test_selector_selects_by_labels_and_fields():
    plant = make_site(slug="plant-7")
    a = make_device(uid="a", site=plant, labels={"env": "prod"}, ram_mb=32768, accelerator="gpu")  # tier 1
    b = make_device(uid="b", site=plant, labels={"env": "lab", "canary": "true"})  # tier 2
    c = make_device(uid="c", labels={"env": "prod"}, ram_mb=1024)  # tier 3, no site
    d = make_device(uid="d", site=plant)  # no env label

    def select(text):
        return set(Device.objects.filter(compile_selector(text)).values_list("uid", flat=True))

    assert select("site=plant-7,tier in (1,2),!canary,env!=lab") == {a.uid, d.uid}
    assert select("env=prod") == {a.uid, c.uid}
    assert select("env notin (prod)") == {b.uid, d.uid}  # notin matches devices without the key
    assert select("canary") == {b.uid}
    assert select("!site") == {c.uid}
    assert select("tier=3") == {c.uid}
    assert select("labels.env=lab") == {b.uid}


@pytest.mark.django_db
def test_field_selectors_validate_their_values():
    with pytest.raises(SelectorError, match="tier must be 1, 2 or 3"):
        compile_selector("site=x,tier=4")
    with pytest.raises(SelectorError, match="status must be one of"):
        compile_selector("status=sleeping")
    with pytest.raises(SelectorError, match="is a device field"):
        compile_selector("tier")


@pytest.mark.django_db
def test_selector_compiles_to_a_single_query(django_assert_num_queries):
    for i in range(20):
        make_device(labels={"env": "prod" if i % 2 else "lab"})
    with django_assert_num_queries(1):
        assert len(list(Device.objects.filter(compile_selector("env=prod,!canary,tier in (2,3)")))) == 10
