"""Varied inputs for the embedding tests: short, long (past the model's 256 tokens), many
languages and scripts, code, numbers and symbols."""

LONG = ("The history of the printing press begins with woodblock printing in East Asia, long "
        "before movable type reached Europe, and its spread reshaped religion, science and "
        "politics across the continent within a few generations. ") * 12

TEXTS = [
    "hi",
    "A",
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password?",
    "Paris is the capital and most populous city of France.",
    "What is the boiling point of water at sea level?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "I love this movie, the soundtrack is fantastic!",
    "The stock market fell sharply after the central bank raised interest rates.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Le chat dort sur le canapé depuis ce matin.",
    "El tren llega a la estación a las ocho y media.",
    "Москва — столица России.",
    "東京は日本の首都です。",
    "我喜欢在周末读书和散步。",
    "مرحبا بكم في المكتبة العامة",
    "नमस्ते, आप कैसे हैं?",
    "def add(a, b):\n    return a + b\n",
    "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
    "for (int i = 0; i < n; ++i) { sum += v[i]; }",
    "<div class=\"card\"><h1>Title</h1></div>",
    "3.14159 2.71828 1.41421 1.73205",
    "Call me at +1 (555) 010-9999 or email jane.doe@example.com",
    "https://example.org/path/to/page?query=embedding&lang=en#section-2",
    "🙂🚀✨ emojis everywhere 🎉",
    "   leading and trailing spaces   ",
    "line one\nline two\n\tindented line three",
    "ALL CAPS SENTENCE ABOUT NOTHING IN PARTICULAR",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "The mitochondria is the powerhouse of the cell; ATP synthesis happens in its inner "
    "membrane through oxidative phosphorylation.",
    LONG,
    LONG[:700],
    "Neural networks learn representations by adjusting weights with gradient descent.",
    "Rain is expected tomorrow afternoon, so bring an umbrella.",
]
