//! `strata chat`: an interactive conversation in the terminal, driving the scheduler
//! in-process. Ctrl-C stops the current answer; at the prompt, a second Ctrl-C (or
//! Ctrl-D) quits; `/reset` forgets the conversation.

use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use strata_model::chat::{ChatMessage, ChatTemplate};
use strata_model::gguf::Gguf;
use strata_model::sampling::SamplingParams;
use strata_model::tokenizer::Tokenizer;
use tokio::io::AsyncBufReadExt;

use crate::cli::ChatArgs;
use crate::engine::Engine;
use crate::scheduler::{Event, GenRequest, Scheduler, SchedulerConfig, step_engine};

pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let path = &args.engine.model;
    let gguf = Gguf::open(path).with_context(|| format!("reading {}", path.display()))?;
    let tokenizer = Arc::new(Tokenizer::from_gguf(&gguf)?);
    let template = ChatTemplate::from_gguf(&gguf)?.context("the model has no chat template (tokenizer.chat_template)")?;
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repeat_penalty: args.repeat_penalty,
        seed: args.seed,
        ..SamplingParams::default()
    };
    sampling.validate()?;
    eprintln!("loading {} ...", path.display());
    let engine = Engine::load(&gguf, &args.engine)?;
    drop(gguf);
    let scheduler = Scheduler::spawn(step_engine(engine), tokenizer.clone(), SchedulerConfig { max_seqs: 1 })?;
    eprintln!("ready. /reset clears the conversation; Ctrl-C stops an answer; Ctrl-D (or Ctrl-C twice) quits.");

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut history: Vec<ChatMessage> = args.system.iter().map(|s| ChatMessage::new("system", s.clone())).collect();
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        let mut out = std::io::stdout();
        let mut armed = false;
        let mut turn = 0u64;
        loop {
            print!("> ");
            out.flush()?;
            let line = tokio::select! {
                line = lines.next_line() => line?,
                _ = tokio::signal::ctrl_c() => {
                    if armed {
                        println!();
                        return Ok(());
                    }
                    armed = true;
                    println!("\n(Ctrl-C again or Ctrl-D to quit)");
                    continue;
                }
            };
            armed = false;
            let Some(line) = line else {
                println!();
                return Ok(());
            };
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if line == "/reset" {
                history.retain(|m| m.role == "system");
                println!("(conversation cleared)");
                continue;
            }
            history.push(ChatMessage::new("user", line));
            let text = template.render(&history, true)?;
            let mut prompt: Vec<u32> = tokenizer.bos_to_add().into_iter().collect();
            prompt.extend(tokenizer.encode(&text, true)?);
            let ctx = scheduler.ctx() as usize;
            if prompt.len() >= ctx {
                history.pop();
                println!("(the conversation is {} tokens, more than the context of {ctx}: /reset, or raise --ctx)", prompt.len());
                continue;
            }
            turn += 1;
            let request = GenRequest {
                max_tokens: args.max_tokens.min((ctx - prompt.len()) as u32),
                prompt,
                sampling: SamplingParams { seed: sampling.seed.wrapping_add(turn), ..sampling.clone() },
                stop: Vec::new(),
                logprobs: None,
            };
            let (_, mut rx) = scheduler.submit(request)?;
            let mut answer = String::new();
            loop {
                tokio::select! {
                    event = rx.recv() => match event {
                        Some(Event::Text(t)) => {
                            print!("{t}");
                            out.flush()?;
                            answer.push_str(&t);
                        }
                        Some(Event::Done(f)) => {
                            if f.reason == crate::scheduler::FinishReason::Length {
                                print!(" [length limit]");
                            }
                            break;
                        }
                        Some(Event::Logprob(_)) => {}
                        Some(Event::Failed(e)) => {
                            print!("\n(error: {e})");
                            break;
                        }
                        None => anyhow::bail!("the scheduler stopped"),
                    },
                    _ = tokio::signal::ctrl_c() => {
                        // Dropping the receiver cancels the request and frees its sequence.
                        print!(" [stopped]");
                        break;
                    }
                }
            }
            drop(rx);
            println!();
            history.push(ChatMessage::new("assistant", answer));
        }
    })
}
