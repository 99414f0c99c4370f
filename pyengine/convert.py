def convert(model, inplace=False): raise NotImplementedError
