// ftx-gotmpl renders Ollama TEMPLATEs with Go's own text/template, the way Ollama's server does for chat
// requests (ollama/ollama template/template.go, Template.Execute, the .Messages path):
//   - consecutive messages with the same role are merged with "\n\n"; all system messages, joined with
//     "\n\n", are also passed as .System
//   - data: {System, Messages, Tools (nil), Response ""}; option missingkey=zero; the `json` function
//
// Ollama inserts the Modelfile's SYSTEM as a first system message when a request has none; the caller
// (ftx.modelfile) does that before calling this program, so this file mirrors only template execution.
//
// Input on stdin: {"template": "...", "conversations": [[{"role": "user", "content": "..."}], ...]}
// Output on stdout: {"rendered": ["...", ...]} or {"error": "..."} with exit status 1.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type request struct {
	Template      string      `json:"template"`
	Conversations [][]Message `json:"conversations"`
}

func collate(msgs []Message) (string, []*Message) {
	var system []string
	var out []*Message
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == m.Role {
			out[len(out)-1].Content += "\n\n" + m.Content
		} else {
			out = append(out, &m)
		}
	}
	return strings.Join(system, "\n\n"), out
}

func fail(err error) {
	b, _ := json.Marshal(map[string]string{"error": err.Error()})
	os.Stdout.Write(b)
	os.Exit(1)
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fail(fmt.Errorf("bad request: %w", err))
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(req.Template)
	if err != nil {
		fail(err)
	}
	rendered := make([]string, 0, len(req.Conversations))
	for _, conv := range req.Conversations {
		system, messages := collate(conv)
		var b bytes.Buffer
		data := map[string]any{"System": system, "Messages": messages, "Tools": nil, "Response": ""}
		if err := tmpl.Execute(&b, data); err != nil {
			fail(err)
		}
		rendered = append(rendered, b.String())
	}
	out, _ := json.Marshal(map[string]any{"rendered": rendered})
	os.Stdout.Write(out)
}
