import Foundation
import ExecuTorchLLM

/// The run's own chat template for one turn, read from `prompt_format.json` beside the .pte (`edgeft export pte`
/// writes it by rendering the run's Jinja template with `{system}` / `{prompt}` placeholders, checked against the
/// Hugging Face rendering): `prompt` (no system prompt: a default one the template inserts is in it),
/// `prompt_with_system`, `num_bos` (BOS tokens the runner adds: ExecuTorch's runner does not apply tokenizer.json's
/// post-processor; the template's own BOS text is left out of the strings) and `stop` (end-of-turn pieces the
/// runner hands over before it stops on the .pte's EOS ids; not shown). Without the file (an older export): ChatML
/// with SmolLM2's default system prompt, edgeft's default model.
struct PromptFormat: Decodable {
  let prompt: String
  let promptWithSystem: String?
  let numBos: Int
  let stop: [String]

  enum CodingKeys: String, CodingKey {
    case prompt, stop
    case promptWithSystem = "prompt_with_system"
    case numBos = "num_bos"
  }

  static let chatml = PromptFormat(
    prompt: "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
      + "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
    promptWithSystem: "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
      + "<|im_start|>assistant\n",
    numBos: 0, stop: ["<|im_end|>"])

  static func load(besides model: String) -> PromptFormat {
    let url = URL(fileURLWithPath: model).deletingLastPathComponent().appendingPathComponent("prompt_format.json")
    guard let data = try? Data(contentsOf: url), let f = try? JSONDecoder().decode(PromptFormat.self, from: data)
    else { return chatml }
    return f
  }

  func fill(_ user: String, system: String = ChatFormat.systemPrompt) -> String {
    if !system.isEmpty, let withSystem = promptWithSystem {
      return withSystem.replacingOccurrences(of: "{system}", with: system)
        .replacingOccurrences(of: "{prompt}", with: user)
    }
    return prompt.replacingOccurrences(of: "{prompt}", with: user)
  }

  /// The reply up to the first end-of-turn piece.
  func cut(_ reply: String) -> String {
    stop.reduce(reply) { r, s in r.components(separatedBy: s)[0] }
  }
}

/// Generation settings.
enum ChatFormat {
  /// Your system prompt for every turn; "" keeps the template's own default (if it has one).
  static let systemPrompt = ""
  static let sequenceLength = 512  // prompt + reply tokens; the runner also caps it at get_max_context_len
  static let temperature = 0.0  // greedy: comparable with `edgeft run --pte ... --prompt ...` on the host
}

/// Owns the runner. Every runner call except stop() runs on `queue`, because generate() blocks until the reply
/// is complete; @Published state is only touched on the main queue.
final class ChatModel: ObservableObject {
  @Published var transcript = ""
  @Published var live = ""
  @Published var status = "not loaded"
  @Published var busy = true

  private var runner: TextRunner?
  private var format = PromptFormat.chatml
  private let queue = DispatchQueue(label: "edgeft.runner", qos: .userInitiated)

  /// The program (model-last.pte, the last-token program of `edgeft export pte --logits last`, else
  /// model.pte) + tokenizer.json from Documents (Finder / devicectl copies), else from the app bundle.
  static func files() -> (model: String, tokenizer: String)? {
    let names = ["model-last", "model"]
    let fm = FileManager.default
    let docs = fm.urls(for: .documentDirectory, in: .userDomainMask)[0]
    let tokenizer = docs.appendingPathComponent("tokenizer.json").path
    if fm.fileExists(atPath: tokenizer),
      let model = names.map({ docs.appendingPathComponent("\($0).pte").path }).first(where: { fm.fileExists(atPath: $0) })
    {
      return (model: model, tokenizer: tokenizer)
    }
    if let t = Bundle.main.path(forResource: "tokenizer", ofType: "json"),
      let m = names.lazy.compactMap({ Bundle.main.path(forResource: $0, ofType: "pte") }).first
    {
      return (model: m, tokenizer: t)
    }
    return nil
  }

  func load() {
    guard let files = Self.files() else {
      status = "model-last.pte or model.pte, and tokenizer.json, not found in Documents or the app bundle"
      return
    }
    let (model, tokenizer) = files
    format = PromptFormat.load(besides: model)
    status = "loading \(model) …"
    queue.async {
      // No special tokens: tokenizer.json names its own (the list is for tiktoken/SentencePiece tokenizers).
      let runner = TextRunner(modelPath: model, tokenizerPath: tokenizer)
      let t0 = Date()
      let message: String
      do {
        try runner.load()  // otherwise the first generate() pays for loading
        message = String(format: "loaded in %.0f ms", Date().timeIntervalSince(t0) * 1000)
      } catch {
        message = "load failed: \(error)"
      }
      DispatchQueue.main.async {
        if runner.isLoaded() { self.runner = runner }
        self.status = message
        self.busy = !runner.isLoaded()
      }
    }
  }

  func send(_ text: String) {
    guard let runner, !busy, !text.isEmpty else { return }
    transcript += "> \(text)\n"
    live = ""
    busy = true
    status = "generating …"
    let format = self.format
    let prompt = format.fill(text)
    queue.async {
      var reply = ""
      var pieces = 0
      var first: Date?
      var failure: Error?
      runner.reset()  // one turn per generate(): back to position 0 of the KV cache
      do {
        try runner.generate(prompt, Config {
          $0.isEchoEnabled = false  // the reply only, not the prompt (GenerationConfig's default echoes)
          $0.sequenceLength = ChatFormat.sequenceLength
          $0.temperature = ChatFormat.temperature
          $0.bosCount = format.numBos
        }) { piece in
          // One call per generated token, on this queue. TextRunner reports no stats, so time them here.
          pieces += 1
          if first == nil { first = Date() }
          reply += piece
          let visible = format.cut(reply)
          if visible != reply { runner.stop() }  // the .pte's EOS ids normally stop it already
          DispatchQueue.main.async { self.live = visible }
        }
      } catch {
        failure = error
      }
      // decode rate: tokens after the first (which comes out of prefill) over the time since the first
      let secs = first.map { Date().timeIntervalSince($0) } ?? 0
      let rate = pieces > 1 && secs > 0 ? Double(pieces - 1) / secs : 0
      let answer = format.cut(reply).trimmingCharacters(in: .whitespacesAndNewlines)
      DispatchQueue.main.async {
        self.transcript += answer + "\n\n"
        self.live = ""
        self.status = failure.map { "generate failed: \($0)" }
          ?? String(format: "%.1f tok/s decode (measured) · %ld tokens", rate, pieces)
        self.busy = false
      }
    }
  }

  func stop() { runner?.stop() }  // safe from any thread: it only raises the generator's stop flag
}
