import Foundation
import ExecuTorchLLM

/// The run's chat template in its simplest form, and the generation settings. ChatML with SmolLM2's default
/// system prompt, because edgeft's default model (smollm2-135m) is trained in it; for another
/// `--chat-template`, copy the framing from the run's `exports/Modelfile` (TEMPLATE, SYSTEM, PARAMETER stop)
/// or its Jinja template (`exports/chat_template.jinja`). `systemPrompt = ""` drops the system turn.
enum ChatFormat {
  static let systemPrompt = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
  static let systemTurn = "<|im_start|>system\n{system}<|im_end|>\n"
  static let userTurn = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
  /// End of turn: the runner hands this piece over before it stops on the .pte's EOS ids; it is not shown.
  static let stop = "<|im_end|>"
  /// BOS tokens the runner puts before the prompt. ExecuTorch's runner does not apply tokenizer.json's
  /// post-processor, so this must be what the HF tokenizer adds: `exports/manifest.json` -> pte.validation.num_bos
  /// (0 for SmolLM2).
  static let bosCount = 0
  static let sequenceLength = 512  // prompt + reply tokens; the runner also caps it at get_max_context_len
  static let temperature = 0.0  // greedy: comparable with `edgeft run --pte ... --prompt ...` on the host

  static func prompt(_ user: String) -> String {
    (systemPrompt.isEmpty ? "" : systemTurn.replacingOccurrences(of: "{system}", with: systemPrompt))
      + userTurn.replacingOccurrences(of: "{prompt}", with: user)
  }
}

/// Owns the runner. Every runner call except stop() runs on `queue`, because generate() blocks until the reply
/// is complete; @Published state is only touched on the main queue.
final class ChatModel: ObservableObject {
  @Published var transcript = ""
  @Published var live = ""
  @Published var status = "not loaded"
  @Published var busy = true

  private var runner: TextRunner?
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
    let prompt = ChatFormat.prompt(text)
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
          $0.bosCount = ChatFormat.bosCount
        }) { piece in
          // One call per generated token, on this queue. TextRunner reports no stats, so time them here.
          pieces += 1
          if first == nil { first = Date() }
          reply += piece
          if reply.contains(ChatFormat.stop) { runner.stop() }  // the .pte's EOS ids normally stop it already
          let visible = reply.components(separatedBy: ChatFormat.stop)[0]
          DispatchQueue.main.async { self.live = visible }
        }
      } catch {
        failure = error
      }
      // decode rate: tokens after the first (which comes out of prefill) over the time since the first
      let secs = first.map { Date().timeIntervalSince($0) } ?? 0
      let rate = pieces > 1 && secs > 0 ? Double(pieces - 1) / secs : 0
      let answer = reply.components(separatedBy: ChatFormat.stop)[0].trimmingCharacters(in: .whitespacesAndNewlines)
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
