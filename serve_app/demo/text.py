"""The small built-in text the demo model is trained on, so its greedy output reads as words.

Written for this project; short on purpose (the model trains on it in about 20 seconds).
"""

DEMO_TEXT = """\
France is a country in western Europe. Its capital is Paris, a city on the river Seine.
France is known for its food, its wine, its art and its long history. The country has
mountains in the east and the south, long coasts on the sea, and green farms in the middle.
Paris has many museums, old bridges and wide streets. People in France speak French.
Germany is a country in central Europe. Its capital is Berlin. Germany is known for its
cars, its music and its forests. Italy is a country in southern Europe. Its capital is Rome,
an old city with many churches. Italy is known for its food, its art and its warm sea.
Spain is a country in south western Europe. Its capital is Madrid. Spain is known for its
sun, its music and its long coasts. Japan is a country in east Asia. Its capital is Tokyo,
a large city with fast trains. Japan is known for its mountains, its gardens and its food.
The sun is a star. The earth moves around the sun once a year. The moon moves around the
earth. Water is made of hydrogen and oxygen. Plants need light, water and air to grow.
A gateway keeps the text of a prompt private. It turns the words into numbers, and only
the numbers go to the model server. The model reads the numbers and writes an answer.
Tell me about France. France is a country in western Europe. Its capital is Paris.
Tell me about Germany. Germany is a country in central Europe. Its capital is Berlin.
Tell me about Italy. Italy is a country in southern Europe. Its capital is Rome.
Tell me about Spain. Spain is a country in south western Europe. Its capital is Madrid.
Tell me about Japan. Japan is a country in east Asia. Its capital is Tokyo.
Tell me about the sun. The sun is a star. The earth moves around the sun once a year.
What is the capital of France? The capital of France is Paris.
What is the capital of Germany? The capital of Germany is Berlin.
What is the capital of Italy? The capital of Italy is Rome.
What is the capital of Japan? The capital of Japan is Tokyo.
"""
