import SwiftUI

@main
struct EdgeftChatApp: App {
  var body: some Scene {
    WindowGroup { ContentView() }
  }
}

struct ContentView: View {
  @StateObject private var chat = ChatModel()
  @State private var input = ""

  var body: some View {
    VStack(spacing: 8) {
      ScrollViewReader { proxy in
        ScrollView {
          Text(chat.transcript + chat.live)
            .frame(maxWidth: .infinity, alignment: .leading)
            .textSelection(.enabled)
            .padding()
          Color.clear.frame(height: 1).id("end")
        }
        .onChange(of: chat.live) { _ in proxy.scrollTo("end") }
      }
      Text(chat.status).font(.footnote).foregroundStyle(.secondary)
      HStack {
        TextField("Message", text: $input).textFieldStyle(.roundedBorder).onSubmit(send)
        Button("Send", action: send).disabled(chat.busy)
        Button("Stop") { chat.stop() }.disabled(!chat.busy)
      }
      .padding(.horizontal)
    }
    .padding(.bottom)
    .onAppear { chat.load() }
  }

  private func send() {
    let text = input.trimmingCharacters(in: .whitespacesAndNewlines)
    input = ""
    chat.send(text)
  }
}
