def average(numbers):
    if not numbers:
        raise ValueError("numbers is empty, so it has no average")
    return sum(numbers) / len(numbers)


scores = [72, 85, 90, 64]
print(round(average(scores), 1))
