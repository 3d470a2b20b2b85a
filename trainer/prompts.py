"""Built-in user prompts for `alchemist simulate`: 80 short, varied, MT-bench-style requests in eight
categories (10 each), written for this project (no dataset text). `PROMPTS[i]` is `(category, text)`."""
from __future__ import annotations

import random

_WRITING = (
    "Write a short thank-you note to a neighbor who watered my plants while I was away.",
    "Draft a two-sentence product description for a reusable water bottle.",
    "Write a haiku about a train station at night.",
    "Compose a friendly reminder email asking a team to submit their timesheets by Friday.",
    "Write the opening line of a mystery novel set in a lighthouse.",
    "Give me a catchy slogan for a small bakery that only sells bread.",
    "Write a short poem about the first snow of winter.",
    "Rewrite this sentence to sound more formal: 'We gotta fix the bug before the demo.'",
    "Write a one-paragraph blog intro about learning to cook as an adult.",
    "Suggest a title for a children's book about a shy dragon.",
)

_ROLEPLAY = (
    "Pretend you are a pirate captain and greet your new crew.",
    "You are a museum tour guide. Introduce the dinosaur hall in a few sentences.",
    "Act as a barista and recommend a drink to someone who dislikes bitter coffee.",
    "Imagine you are a medieval knight describing a smartphone for the first time.",
    "You are a travel agent. Pitch a weekend trip to the mountains.",
    "Play a strict but fair chess coach giving advice after a lost game.",
    "Pretend to be a weather reporter announcing a surprise heat wave.",
    "You are a librarian. Explain to a child how to find a book on sharks.",
    "Act as a startup founder giving a ten-second elevator pitch for a dog-walking app.",
    "You are a ship's AI. Tell the crew that fuel is running low, calmly.",
)

_REASONING = (
    "If all roses are flowers and some flowers fade quickly, must some roses fade quickly? Explain.",
    "A farmer has 17 sheep and all but 9 run away. How many are left?",
    "Which is heavier, a kilogram of feathers or a kilogram of iron?",
    "Tom is taller than Ann, and Ann is taller than Bo. Who is the shortest?",
    "If today is Wednesday, what day will it be 10 days from now?",
    "A bat and a ball cost 1.10 dollars; the bat costs 1 dollar more than the ball. What does the ball cost?",
    "Why might a store put milk at the back of the shop?",
    "I have two coins that add up to 30 cents and one is not a nickel. What are they?",
    "If it takes 5 machines 5 minutes to make 5 widgets, how long do 100 machines take for 100 widgets?",
    "Should you switch doors in the Monty Hall problem? Give a short reason.",
)

_MATH = (
    "What is 15 percent of 240?",
    "Solve for x: 3x + 7 = 22.",
    "What is the sum of the integers from 1 to 50?",
    "Is 91 a prime number?",
    "Convert 3/8 to a decimal.",
    "What is the area of a circle with radius 4?",
    "Find the next number in the sequence 2, 6, 12, 20, 30.",
    "What is the derivative of x squared times 5?",
    "A rectangle has a perimeter of 30 and a width of 5. What is its length?",
    "How many ways can you arrange the letters of the word CAT?",
)

_CODING = (
    "Write a Python function that reverses a string.",
    "How do I read a text file line by line in Python?",
    "What does the SQL keyword DISTINCT do?",
    "Write a JavaScript one-liner that sums an array of numbers.",
    "Explain the difference between a list and a tuple in Python.",
    "Write a bash command that counts the lines in every .txt file in a folder.",
    "What is a race condition?",
    "Write a Python function that checks whether a number is even.",
    "How do you create a new branch in git?",
    "What is the time complexity of binary search?",
)

_EXTRACTION = (
    "Extract the dates from this text: 'The meeting moved from May 3 to May 10, and the review is June 1.'",
    "List the names in this sentence: 'Maria met Jonas and Priya at the station.'",
    "What is the price in this line: 'Fresh apples, 2.49 per kilo, today only'?",
    "Pull out the email address: 'Contact us at help@example.org for support.'",
    "Which cities are mentioned: 'We flew from Oslo to Lisbon, then took a train to Porto.'",
    "Summarize in one sentence: "
    "'The library will close early on Friday for staff training and reopen Saturday.'",
    "Extract the ingredients: 'Mix flour, sugar and two eggs, then add milk.'",
    "What is the sentiment of this review: 'The food was cold and the waiter ignored us.'",
    "Find the phone number in: 'Call 555-0142 after 6 pm.'",
    "Classify this as sports, politics or science: 'The probe sent back images of Saturn's rings.'",
)

_STEM = (
    "Why is the sky blue?",
    "What does a mitochondrion do in a cell?",
    "Explain in simple terms what a black hole is.",
    "Why does ice float on water?",
    "What is the difference between weather and climate?",
    "How does a vaccine train the immune system?",
    "What causes the seasons on Earth?",
    "What is photosynthesis?",
    "Why do metals conduct electricity well?",
    "What is the speed of light, roughly?",
)

_HUMANITIES = (
    "Who wrote Romeo and Juliet?",
    "What was the main cause of the fall of the Western Roman Empire?",
    "Explain the idea of supply and demand in two sentences.",
    "What is the difference between a democracy and a monarchy?",
    "Name one important idea from the philosopher Socrates.",
    "Why was the printing press important?",
    "What is the purpose of a constitution?",
    "Describe impressionism in painting briefly.",
    "What is inflation?",
    "Why do many languages share similar words for 'mother'?",
)

CATEGORIES = {"writing": _WRITING, "roleplay": _ROLEPLAY, "reasoning": _REASONING, "math": _MATH,
              "coding": _CODING, "extraction": _EXTRACTION, "stem": _STEM, "humanities": _HUMANITIES}

PROMPTS: tuple[tuple[str, str], ...] = tuple((cat, text) for cat, texts in CATEGORIES.items()
                                             for text in texts)


def prompt_order(seed: int, count: int) -> list[int]:
    """`count` prompt indices: the list cycled through in a fresh seeded shuffle per pass."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < count:
        indices = list(range(len(PROMPTS)))
        rng.shuffle(indices)
        order.extend(indices)
    return order[:count]
