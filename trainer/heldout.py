"""A fixed held-out text set for perplexity checks (written for this project; not training data)."""

HELDOUT_TEXTS = [
    "The river rose slowly through the night, and by morning the low fields near the mill were under "
    "a thin sheet of brown water. Farmers moved their animals to the ridge and waited for the rain to stop.",
    "To make a simple vinaigrette, whisk three parts olive oil with one part vinegar, add a pinch of salt "
    "and a little mustard, and taste before you pour it over the salad.",
    "A prime number has exactly two divisors: one and itself. The first few primes are two, three, five, "
    "seven and eleven, and there are infinitely many of them.",
    "The library opens at nine on weekdays and at ten on Saturdays. Books can be borrowed for three weeks "
    "and renewed twice, unless another reader has reserved them.",
    "Photosynthesis lets plants turn light, water and carbon dioxide into sugar and oxygen. Most of it "
    "happens in the leaves, inside small green structures called chloroplasts.",
    "When the train stopped between two stations, the passengers looked up from their phones, listened to "
    "a short announcement about a signal fault, and went back to reading.",
    "In Python, a list comprehension builds a new list from an existing one in a single line, for example "
    "squares = [x * x for x in range(10)].",
    "The committee met on Tuesday to discuss the budget for next year. After a long debate, it agreed to "
    "spend more on repairs to the school buildings and less on new equipment.",
    "Honey bees communicate the direction and distance of flowers to each other with a waggle dance "
    "performed on the vertical surface of the comb.",
    "She packed a warm coat, two books and a thermos of tea, then walked to the bus stop in the grey light "
    "of an early winter morning.",
    "Water boils at one hundred degrees Celsius at sea level, but at lower temperatures on high mountains, "
    "where the air pressure is lower.",
    "A good password is long, hard to guess and used for only one account. A password manager can remember "
    "them so that you do not have to.",
]
