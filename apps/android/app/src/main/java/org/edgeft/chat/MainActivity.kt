package org.edgeft.chat

import android.app.Activity
import android.os.Bundle
import android.os.SystemClock
import android.view.ViewGroup.LayoutParams.MATCH_PARENT
import android.view.ViewGroup.LayoutParams.WRAP_CONTENT
import android.widget.Button
import android.widget.EditText
import android.widget.LinearLayout
import android.widget.ScrollView
import android.widget.TextView
import java.io.File
import java.util.concurrent.Executors
import org.json.JSONObject
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule

/**
 * Where `adb push` puts the run's exports. If this device's SELinux policy keeps apps out of /data/local/tmp,
 * push to the app's own external files directory instead (tried second), or pass any directory:
 * `adb shell am start -n org.edgeft.chat/.MainActivity --es dir /some/dir`.
 */
const val DEFAULT_DIR = "/data/local/tmp/edgeft"
// the deployment program first (`edgeft export pte --logits last`), else the all-positions one
val MODEL_FILES = listOf("model-last.pte", "model.pte")

/**
 * The run's own chat template for one turn, read from `prompt_format.json` beside the .pte (`edgeft export pte`
 * writes it by rendering the run's Jinja template with `{system}` / `{prompt}` placeholders, checked against the
 * Hugging Face rendering): `prompt` (no system prompt: any default one the template inserts is in it),
 * `prompt_with_system`, `num_bos` (BOS tokens the runner adds: ExecuTorch's runner does not apply tokenizer.json's
 * post-processor, so this is what the HF tokenizer adds; the template's own BOS text is left out of the strings)
 * and `stop` (end-of-turn pieces: the runner hands one over before it stops on the .pte's EOS ids; not shown).
 * Without the file (an older export): ChatML with SmolLM2's default system prompt, edgeft's default model.
 */
class PromptFormat(val prompt: String, val promptWithSystem: String?, val numBos: Int, val stop: List<String>) {
    fun fill(user: String, system: String = SYSTEM_PROMPT): String =
        if (system.isNotEmpty() && promptWithSystem != null) {
            promptWithSystem.replace("{system}", system).replace("{prompt}", user)
        } else {
            prompt.replace("{prompt}", user)
        }

    companion object {
        private const val CHATML_SYSTEM = "<|im_start|>system\n{system}<|im_end|>\n"
        private const val CHATML_USER = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        val CHATML = PromptFormat(
            CHATML_SYSTEM.replace("{system}", "You are a helpful AI assistant named SmolLM, trained by Hugging Face") +
                CHATML_USER,
            CHATML_SYSTEM + CHATML_USER, 0, listOf("<|im_end|>"),
        )

        fun load(dir: String): PromptFormat {
            val f = File(dir, "prompt_format.json")
            if (!f.canRead()) return CHATML
            val j = JSONObject(f.readText())
            val stops = j.getJSONArray("stop")
            return PromptFormat(
                j.getString("prompt"),
                if (j.isNull("prompt_with_system")) null else j.getString("prompt_with_system"),
                j.getInt("num_bos"),
                (0 until stops.length()).map { stops.getString(it) },
            )
        }
    }
}

/** Your system prompt for every turn; "" keeps the template's own default (if it has one). */
const val SYSTEM_PROMPT = ""

const val SEQ_LEN = 512 // prompt + reply tokens; the runner also caps it at the .pte's get_max_context_len
const val TEMPERATURE = 0f // greedy: the reply can be compared with `edgeft run --pte ... --prompt ...` on the host

class MainActivity : Activity() {
    // Every LlmModule call except stop() runs on this one thread: generate() blocks until the reply is done.
    private val worker = Executors.newSingleThreadExecutor()
    @Volatile private var module: LlmModule? = null
    @Volatile private var format: PromptFormat = PromptFormat.CHATML
    private val transcript = StringBuilder()

    private lateinit var output: TextView
    private lateinit var scroll: ScrollView
    private lateinit var status: TextView
    private lateinit var input: EditText
    private lateinit var send: Button
    private lateinit var stop: Button

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        buildUi()
        // getExternalFilesDir also creates /sdcard/Android/data/org.edgeft.chat/files for `adb push`
        val dir = intent.getStringExtra("dir")
            ?: listOfNotNull(DEFAULT_DIR, getExternalFilesDir(null)?.path).firstOrNull { d ->
                MODEL_FILES.any { File(d, it).canRead() }
            }
            ?: DEFAULT_DIR
        // the last-token program (`edgeft export pte --logits last`) when present: less prefill work and memory
        val model = MODEL_FILES.map { File(dir, it) }.firstOrNull { it.canRead() }?.path ?: "$dir/model.pte"
        status.text = "loading $model …"
        format = PromptFormat.load(dir)
        worker.execute {
            val msg =
                try {
                    val t0 = SystemClock.elapsedRealtime()
                    // (modelType, model, tokenizer, temperature, dataFiles, numBos, numEos): the overload that
                    // takes numBos; the three-argument one (model, tokenizer, temperature) fixes it at 0.
                    val m = LlmModule(
                        LlmModule.MODEL_TYPE_TEXT, model, "$dir/tokenizer.json",
                        TEMPERATURE, emptyList<String>(), format.numBos, 0,
                    )
                    m.load() // otherwise the first generate() pays for loading
                    module = m
                    "loaded in ${SystemClock.elapsedRealtime() - t0} ms"
                } catch (e: Exception) { // missing file, unreadable .pte, missing operator, ...
                    "load failed: ${e.message}"
                }
            runOnUiThread {
                status.text = msg
                send.isEnabled = module != null
            }
        }
    }

    private fun buildUi() {
        output = TextView(this).apply { setTextIsSelectable(true); setPadding(24, 24, 24, 24) }
        scroll = ScrollView(this).apply { addView(output) }
        status = TextView(this).apply { setPadding(24, 8, 24, 8) }
        input = EditText(this).apply { hint = "Message"; layoutParams = LinearLayout.LayoutParams(0, WRAP_CONTENT, 1f) }
        send = Button(this).apply { text = "Send"; isEnabled = false; setOnClickListener { onSend() } }
        stop = Button(this).apply { text = "Stop"; isEnabled = false; setOnClickListener { module?.stop() } }
        val row = LinearLayout(this).apply { addView(input); addView(send); addView(stop) }
        setContentView(
            LinearLayout(this).apply {
                orientation = LinearLayout.VERTICAL
                addView(scroll, LinearLayout.LayoutParams(MATCH_PARENT, 0, 1f))
                addView(status)
                addView(row, LinearLayout.LayoutParams(MATCH_PARENT, WRAP_CONTENT))
            }
        )
    }

    private fun onSend() {
        val m = module ?: return
        val text = input.text.toString().trim()
        if (text.isEmpty()) return
        input.setText("")
        transcript.append("> ").append(text).append("\n")
        show("")
        send.isEnabled = false
        stop.isEnabled = true
        status.text = "generating …"
        val fmt = format
        val prompt = fmt.fill(text)

        worker.execute {
            val reply = StringBuilder()
            var pieces = 0
            var tFirst = 0L
            var statusLine: String? = null
            val callback = object : LlmCallback {
                // On this worker thread, once per decoded piece (the JNI layer holds back bytes until they
                // form valid UTF-8, so a piece can be more than one token).
                override fun onResult(result: String) {
                    if (pieces++ == 0) tFirst = SystemClock.elapsedRealtime()
                    reply.append(result)
                    val cut = fmt.stop.map { reply.indexOf(it) }.filter { it >= 0 }.minOrNull() ?: -1
                    if (cut >= 0) m.stop() // the .pte's get_eos_ids normally stops it already
                    val visible = if (cut >= 0) reply.substring(0, cut) else reply.toString()
                    runOnUiThread { show(visible) }
                }

                // Once, after generation: JSON from extension/llm/runner/stats.h (stats_to_json_string).
                override fun onStats(stats: String) {
                    statusLine = formatStats(stats)
                }

                override fun onError(errorCode: Int, message: String) {
                    statusLine = "error $errorCode: $message"
                }
            }
            try {
                m.resetContext() // one turn per generate(): position 0, and the BOS (if any) again
                m.generate(prompt, SEQ_LEN, callback, false) // echo=false: the reply only, not the prompt
            } catch (e: Exception) {
                statusLine = statusLine ?: "generate failed: ${e.message}"
            }
            // measured fallback: pieces after the first over the time since the first (decode only)
            val secs = (SystemClock.elapsedRealtime() - tFirst) / 1000.0
            val measured = if (pieces > 1 && secs > 0) "%.1f pieces/s (measured)".format((pieces - 1) / secs) else ""
            val answer = fmt.stop.fold(reply.toString()) { r, s -> r.substringBefore(s) }.trim()
            runOnUiThread {
                transcript.append(answer).append("\n\n")
                show("")
                status.text = statusLine ?: measured
                send.isEnabled = true
                stop.isEnabled = false
            }
        }
    }

    /** The runner's own rates; null (use the measured rate) when the JSON lacks them. */
    private fun formatStats(json: String): String? {
        val s = runCatching { JSONObject(json) }.getOrNull() ?: return null
        if (!s.has("decode_token_per_sec")) return null // absent when decoding took 0 ms
        return "%.1f tok/s decode · %.0f tok/s prefill · %d prompt + %d generated tokens".format(
            s.getDouble("decode_token_per_sec"), s.optDouble("prefill_token_per_sec", 0.0),
            s.optLong("prompt_tokens"), s.optLong("generated_tokens"),
        )
    }

    private fun show(live: String) {
        output.text = transcript.toString() + live
        scroll.post { scroll.fullScroll(ScrollView.FOCUS_DOWN) }
    }

    override fun onDestroy() {
        module?.stop()
        worker.execute { module?.close(); module = null } // after any generate() still running has returned
        worker.shutdown()
        super.onDestroy()
    }
}
