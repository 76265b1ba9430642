def celsius_to_fahrenheit(celsius):
    return celsius * 9 / 5 + 32


temperatures = [0, 25, 100]
for value in temperatures:
    print(value, "C is", celsius_to_fahrenheit(value), "F")
