from leanfm.engine.stop import StopMatcher


def feed(stops, deltas):
    m = StopMatcher(tuple(stops))
    out = []
    for d in deltas:
        text, stopped = m.push(d)
        out.append(text)
        if stopped:
            return "".join(out), True, m
    text, stopped = m.push("", final=True)
    out.append(text)
    return "".join(out), stopped, m


def test_no_stops_passes_through():
    assert feed([], ["ab", "c"])[:2] == ("abc", False)


def test_stop_across_deltas_is_cut_and_never_shown():
    text, stopped, m = feed(["END"], ["hello E", "N", "D more"])
    assert (text, stopped) == ("hello ", True)
    assert m.text == "hello "


def test_partial_prefix_released_when_not_a_stop():
    m = StopMatcher(("END",))
    assert m.push("hi E") == ("hi ", False)  # 'E' held back
    assert m.push("x") == ("Ex", False)


def test_held_text_flushed_at_end():
    assert feed(["END"], ["abc EN"])[:2] == ("abc EN", False)


def test_earliest_of_several_stops_wins():
    text, stopped, _ = feed(["\n\n", "###"], ["a ### b\n\nc"])
    assert (text, stopped) == ("a ", True)
